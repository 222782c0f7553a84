"""A fake upstream registry on loopback for faults a real registry cannot produce: poisoned
bytes, resets mid-stream, short bodies, 429 and 5xx answers, and hanging responses."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from tests.support.servers import LoopbackHTTP, ThrottledRelay, free_port, send_json


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # Fault knobs
    send_bytes: int | None = None  # stop after this many body bytes
    reset: bool = False  # then reset the connection instead of closing cleanly
    delay: float = 0.0  # before answering
    body_delay: float = 0.0  # after the headers, before the first body byte
    trickle: float = 0.0  # seconds between 64 KiB chunks
    honour_range: bool = True
    abort: bool = False  # reset the connection instead of answering at all
    faulty_requests: int = 1 << 30  # the fault knobs apply to this many requests, then stop
    # Only requests whose bytes include this offset are faulty (one range of a parallel fill).
    fault_at: int | None = None
    rest_trickle: float = 0.0  # seconds between 64 KiB chunks of the requests not faulty
    # GETs answer 307 to a one-time URL on this server (a CDN's expiring, presigned URL),
    # which serves the body without asking for Authorization; a second use is a 403.
    cdn: bool = False
    # A range that does not start at 0 is answered with the blob's start instead (a broken
    # CDN): the Content-Range says so.
    misplaced_ranges: bool = False
    # The body in HTTP/1.1 chunks (Transfer-Encoding: chunked) instead of a Content-Length.
    chunked: bool = False


class FakeRegistry(LoopbackHTTP):
    """Serves the routes it is given; `hits` counts (method, path) pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, Route] = {}
        self.hits: list[tuple[str, str]] = []
        self.ranges: list[str | None] = []
        self.authorizations: list[str | None] = []
        # When set, requests without this exact Authorization get `challenge` (Basic by
        # default); `/token` (a token service's route) is answered without it.
        self.require_authorization: str | None = None
        self.challenge = 'Basic realm="fake"'
        self.cdn_urls: dict[str, Route | None] = {}  # one-time path -> route (None: used)
        self.body_bytes = 0  # body bytes written to clients, all routes
        self.active = 0  # GETs answering now
        self.max_active = 0
        self._lock = threading.Lock()

    def count(self, method: str, path_part: str) -> int:
        return sum(1 for m, p in self.hits if m == method and path_part in p)

    def add_blob(self, repository: str, data: bytes, **knobs) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.routes[f"/v2/{repository}/blobs/{digest}"] = Route(body=data, **knobs)
        return digest

    def start(self) -> FakeRegistry:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(head=True)

            def do_GET(self):
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                fake.hits.append((self.command, path))
                fake.ranges.append(self.headers.get("Range"))
                fake.authorizations.append(self.headers.get("Authorization"))
                wanted = fake.require_authorization
                from_cdn = path.startswith("/_cdn/")
                exempt = from_cdn or path == "/token"
                if wanted and not exempt and self.headers.get("Authorization") != wanted:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", fake.challenge)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path == "/v2/":
                    return self._simple(200, b"{}")
                if self.command == "GET":
                    # Only answers that go past the credentials check count as active.
                    with fake._lock:
                        fake.active += 1
                        fake.max_active = max(fake.max_active, fake.active)
                    try:
                        return self._route(head, path, from_cdn)
                    finally:
                        with fake._lock:
                            fake.active -= 1
                return self._route(head, path, from_cdn)

            def _route(self, head: bool, path: str, from_cdn: bool) -> None:
                # A route may name its query too (`...?last=x`, a page of a listing).
                route = fake.routes.get(self.path) or fake.routes.get(path)
                if from_cdn:
                    route = fake.cdn_urls.get(path)
                    if route is None:
                        return self._simple(403, b"expired")
                    if self.command == "GET":
                        fake.cdn_urls[path] = None
                elif route is not None and route.cdn and self.command == "GET":
                    where = f"/_cdn/{len(fake.cdn_urls)}"
                    fake.cdn_urls[where] = route
                    self.send_response(307)
                    self.send_header("Location", where)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if route is None:
                    return self._simple(404, b'{"errors":[{"code":"NOT_FOUND","message":"nope"}]}')
                rng = self.headers.get("Range")
                first, last = 0, len(route.body) - 1
                if rng and route.honour_range and route.status == 200 and rng.startswith("bytes="):
                    low, _, high = rng[6:].partition("-")
                    first = int(low)
                    last = min(int(high), last) if high else last
                covers = route.fault_at is None or first <= route.fault_at <= last
                faulty = route.faulty_requests > 0 and covers
                if self.command == "GET" and covers:
                    route.faulty_requests -= 1
                if route.abort and faulty:
                    self._reset()
                    return
                if route.delay and faulty:
                    time.sleep(route.delay)
                body = route.body
                status = route.status
                start = 0
                headers = dict(route.headers)
                if rng and route.honour_range and status == 200 and rng.startswith("bytes="):
                    if route.misplaced_ranges and first > 0:
                        first, last = 0, last - first
                    start = first
                    headers["Content-Range"] = f"bytes {first}-{last}/{len(body)}"
                    status = 206
                    body = body[first : last + 1]
                self.send_response(status)
                headers.setdefault("Content-Type", "application/octet-stream")
                for name, value in headers.items():
                    self.send_header(name, value)
                if route.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if head:
                    return
                cut = route.send_bytes if faulty else None
                limit = len(body) if cut is None else max(cut - start, 0)
                sent = 0
                try:
                    if route.body_delay and faulty:
                        self.wfile.flush()
                        time.sleep(route.body_delay)
                    while sent < limit:
                        chunk = body[sent : min(sent + 65536, limit)]
                        if route.chunked:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        else:
                            self.wfile.write(chunk)
                        self.wfile.flush()
                        sent += len(chunk)
                        with fake._lock:
                            fake.body_bytes += len(chunk)
                        if route.trickle and faulty:
                            time.sleep(route.trickle)
                        elif route.rest_trickle and not faulty:
                            time.sleep(route.rest_trickle)
                except (BrokenPipeError, ConnectionResetError):
                    return
                if route.chunked and cut is None:
                    self.wfile.write(b"0\r\n\r\n")
                if cut is not None:
                    if route.reset:
                        time.sleep(0.3)  # let the client read what was sent before the RST
                        self._reset()
                        return
                    self.close_connection = True
                    self.connection.close()

            def _reset(self) -> None:
                # SO_LINGER with a zero timeout: close() sends RST, not FIN.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                self.close_connection = True
                self.connection.close()

            def _simple(self, status: int, body: bytes) -> None:
                send_json(self, status, body)

        self._serve(Handler)
        return self


class FrozenServer:
    """Accepts TCP connections and never answers: an upstream that hangs."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._conns: list[socket.socket] = []
        self._stop = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FrozenServer:
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(128)

        def accept() -> None:
            while not self._stop:
                try:
                    conn, _ = self._sock.accept()
                except OSError:
                    return
                self._conns.append(conn)

        threading.Thread(target=accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._sock.close()
        for conn in self._conns:
            conn.close()


class _RequestRelay(ThrottledRelay):
    """A relay without a cap worth the name, there for what it does to requests."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port, mib_per_s=1 << 20)


class TamperingRelay(_RequestRelay):
    """A relay on loopback in front of a real server that changes one byte of a request body
    on its way (the first byte of the body of each connection's first request, if a PUT):
    what a faulty NIC or middlebox does to an upload, which no real store does on demand."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.tampered = 0

    def _request_editor(self) -> Callable[[bytes], bytes]:
        # The headers pass as they come (a client that sends Expect: 100-continue waits
        # for the server's answer to them); everything after the flipped byte is untouched.
        head = bytearray()
        state = "headers"

        def edit(data: bytes) -> bytes:
            nonlocal state
            body_at = 0
            if state == "headers":
                head.extend(data)
                end = head.find(b"\r\n\r\n")
                if end >= 0:
                    state = "body" if head.startswith(b"PUT ") else "done"
                    body_at = end + 4 - (len(head) - len(data))
            if state == "body" and body_at < len(data):
                state = "done"
                self.tampered += 1
                return data[:body_at] + bytes([data[body_at] ^ 0x01]) + data[body_at + 1 :]
            return data

        return edit


class StallingRelay(_RequestRelay):
    """A relay on loopback in front of a real store that holds each PUT of a fill's piece
    (a request line `PUT .../uploads/...`) until `gate` is set, or `hold` seconds: a store
    slow to take a write, which Swift on loopback is not on demand."""

    def __init__(self, target_port: int, hold: float = 5.0) -> None:
        super().__init__(target_port)
        self.gate = threading.Event()
        self.hold = hold
        self.held = 0

    def _request_editor(self) -> Callable[[bytes], bytes]:
        def edit(data: bytes) -> bytes:
            line = data.split(b"\r\n", 1)[0]
            if line.startswith(b"PUT ") and b"/uploads/" in line:
                self.held += 1
                self.gate.wait(self.hold)
            return data

        return edit
