"""A hostile upstream registry on loopback: every answer it gives is set by the test (in the
fuzz test, drawn by hypothesis): status, body, headers, a body cut short, a challenge and the
token service's answer."""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from tests.support.servers import LoopbackHTTP

# What a request is about, from its path.
KINDS = ("tags", "manifest", "referrers", "blob", "token")
_PATH = re.compile(
    r"/v2/(?P<name>.+)/(?P<kind>tags/list|manifests|referrers|blobs)(?:/(?P<ref>.*))?"
)


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut_at: int | None = None  # send only this many body bytes of a longer Content-Length


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class HostileRegistry(LoopbackHTTP):
    """Answers each kind of request (`KINDS`) with `answers[kind]`; `$digest` in a header
    stands for the digest of the answer's own body. With `challenge` set, a request without
    an Authorization header gets a 401 carrying it."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Answer] = {kind: Answer(status=404) for kind in KINDS}
        self.challenge: str | None = None
        self.hits: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def start(self) -> HostileRegistry:
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer()

            def do_GET(self):
                self._answer()

            def _answer(self) -> None:
                path = self.path.split("?", 1)[0]
                with hostile._lock:
                    hostile.hits.append((self.command, path))
                if path == "/v2/":
                    return self._send(Answer(body=b"{}"))
                if path == "/token":
                    return self._send(hostile.answers["token"])
                if hostile.challenge and not self.headers.get("Authorization"):
                    return self._send(
                        Answer(status=401, headers={"WWW-Authenticate": hostile.challenge})
                    )
                match = _PATH.fullmatch(path)
                # Anything else under /v2/ (a path a `..` in a name turned into) is asked
                # as a manifest: what a careless cache would take it for.
                kind = (
                    {"tags/list": "tags", "manifests": "manifest", "blobs": "blob"}.get(
                        match.group("kind"), match.group("kind")
                    )
                    if match is not None
                    else "manifest"
                )
                self._send(hostile.answers[kind])

            def _send(self, answer: Answer) -> None:
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value.replace("$digest", digest_of(answer.body)))
                if not any(name.lower() == "content-length" for name in answer.headers):
                    self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                body = answer.body
                if answer.cut_at is not None and answer.cut_at < len(body):
                    body = body[: answer.cut_at]
                    self.close_connection = True
                try:
                    self.wfile.write(body)
                except OSError:
                    self.close_connection = True

        self._serve(Handler)
        return self
