"""Serving tweaks for gunicorn's gevent workers, installed per worker by
deploy/gunicorn.conf.py: a prompt graceful stop, zero-copy sendfile, a Date header formatted
once a second, a small body sent with its headers in one send(), TLS handshakes on the
plain HTTP port logged as what they are, and gunicorn's own log lines (GunicornLogger) and a
failed greenlet's traceback in pullthrough's log format.

On SIGTERM gunicorn stops accepting and waits for its connections; a keep-alive connection
idle between requests (Docker daemons keep them for minutes) would hold the worker until
`keepalive` or `graceful_timeout` runs out. With this, the worker closes those idle
connections at once, while responses in flight (a long blob stream) finish, bounded by
`graceful_timeout`. Installed per worker after gevent has patched the process, by wrapping
the worker's own methods, so gunicorn's stock gevent worker class is kept.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from typing import Any

from gunicorn.glogging import Logger

from registry import logs


class GunicornLogger(Logger):
    """gunicorn's logger (its `logger_class`), whose lines take pullthrough's format: one
    JSON object a line in JSON mode, like every other line on the stream."""

    def _set_handler(self, log: Any, output: Any, fmt: Any, stream: Any = None) -> None:
        super()._set_handler(log, output, logs.formatter(), stream)


def greenlet_errors_logged() -> None:
    """A greenlet that dies of an exception is logged as one record (gevent's hub would
    print its traceback straight to stderr, lines of no format)."""
    import logging

    import gevent

    hub = gevent.get_hub()
    log = logging.getLogger("registry.serving")

    def print_exception(context: Any, kind: Any, value: Any, tb: Any) -> None:
        log.error("greenlet %s failed", str(context)[:200], exc_info=(kind, value, tb))

    hub.print_exception = print_exception


def end(sock: Any) -> None:
    """Shut the connection down so that its handler's pending read sees a clean end of
    stream. gevent's own shutdown() would instead raise EBADF in the waiting greenlet (and
    gunicorn would log a traceback per connection), so go to the real socket beneath."""
    with contextlib.suppress(OSError):
        getattr(sock, "_sock", sock).shutdown(socket.SHUT_RDWR)


def prompt_graceful_stop(worker: Any) -> None:
    import gevent

    idle: set[socket.socket] = set()
    handle, handle_request, handle_exit = worker.handle, worker.handle_request, worker.handle_exit

    def tracked_handle(listener: Any, client: Any, addr: Any) -> Any:
        idle.add(client)  # waiting for its first request
        try:
            return handle(listener, client, addr)
        finally:
            idle.discard(client)

    def tracked_request(listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        idle.discard(sock)
        try:
            return handle_request(listener_name, req, sock, addr)
        finally:
            if worker.alive:
                idle.add(sock)  # waiting for the next request on this connection
            else:
                # Stopping: this response is complete, so end the connection now rather
                # than wait for a next request that keep-alive would allow.
                end(sock)

    def close_idle() -> None:
        for sock in list(idle):
            end(sock)

    def on_term(sig: int, frame: Any) -> None:
        handle_exit(sig, frame)
        gevent.spawn(close_idle)

    worker.handle = tracked_handle
    worker.handle_request = tracked_request
    signal.signal(signal.SIGTERM, on_term)


# The first byte of a TLS record carrying a handshake (a ClientHello).
TLS_HANDSHAKE = b"\x16"
TLS_ADVICE = (
    "TLS handshake from %s on the plain HTTP port, and no request over http followed: the "
    "client expects https. Configure the cache as an http (insecure) registry: Docker "
    '"insecure-registries" or an http:// registry-mirrors entry, podman/skopeo insecure = '
    "true in registries.conf (or --tls-verify=false), containerd an http:// host in hosts.toml"
)
TLS_FELL_BACK = (
    "%s tried https on the plain HTTP port first and came back over http, as a client "
    "configured with an insecure (http) registry does: nothing to change"
)
# How long a client has to come back over http after its TLS handshake (podman and skopeo
# with `insecure = true`, Docker's insecure-registries: at once), and how often a client's
# handshakes are told in the log.
FALLBACK_WAIT = 3.0
SAID_EVERY = 3600.0


# 426 Upgrade Required (RFC 9110 15.5.22): engines that print only the status code's own
# text (skopeo's and podman's ping) still say what is wrong.
PLAIN_REFUSED_BODY = (
    b'{"errors":[{"code":"UNSUPPORTED","message":"plain HTTP is off (server.plain: false): '
    b'connect with https://"}]}'
)
PLAIN_REFUSED = (
    b"HTTP/1.1 426 Upgrade Required: this cache speaks https only, use https://\r\n"
    b"Upgrade: TLS/1.3, HTTP/1.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(PLAIN_REFUSED_BODY), PLAIN_REFUSED_BODY)
)
# A TLS connection's body is read and encrypted this much at a time.
COPY_CHUNK = 256 << 10
# A client gets this long to finish its TLS handshake.
HANDSHAKE_TIMEOUT = 10.0
# A refused client gets this long to read its answer (a TLS alert, the 426) before the
# connection closes.
LINGER = 2.0


def _address(addr: Any) -> str:
    return addr[0] if isinstance(addr, tuple) else str(addr)


def linger(sock: Any, seconds: float = LINGER) -> None:
    """End a connection the client may still be writing to: a FIN after what was sent (a
    TLS alert, an error answer), what the client sends read and dropped until it closes or
    `seconds` pass, then close. Closing with its bytes unread would send a reset, which can
    reach the client before the answer and leave it saying only "broken pipe"."""
    from gevent.socket import wait_read

    raw = getattr(sock, "_sock", sock)
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                if not raw.recv(65536):
                    break
            except BlockingIOError:
                wait_read(raw.fileno(), timeout=left)
    except OSError:  # a reset, or the wait ran out (TimeoutError)
        pass
    sock.close()


def tls_and_plain(worker: Any) -> None:
    """Tell each connection's protocol from its first byte (one peek per connection, not
    per request). With `server.tls` a ClientHello gets the TLS handshake (a client
    certificate verified when `client_ca` is set), and plain HTTP is served beside it unless
    `server.plain` is false, when it gets a 426 saying to use https.

    Without `server.tls` a ClientHello is answered by ending the connection, and the
    operator is told once per client per hour: as a problem with its fix when that client
    did not come back over http (it was never told the cache is http), as information when
    it did (podman and skopeo with `insecure = true` try https first on every pull)."""
    import logging

    import gevent
    from gevent import ssl as gevent_ssl

    if worker.cfg.is_ssl:
        return  # gunicorn's own TLS (certfile in its config): every connection is TLS
    log = logging.getLogger("registry.access")
    # The app this worker serves (another app under this config, the benchmark's floor,
    # has neither settings nor a Hosts table: each handshake is then told as it comes).
    pullthrough = getattr(worker.wsgi, "extensions", {}).get("pullthrough")
    hosts = pullthrough.coord.hosts if pullthrough is not None else None
    settings = pullthrough.settings if pullthrough is not None else None
    server_tls = None
    if settings is not None and settings.server_tls is not None:
        from registry.tls import ServerTls

        server_tls = ServerTls(settings.server_tls, context_class=gevent_ssl.SSLContext)
    plain = settings is None or settings.server_plain
    handle = worker.handle

    def refuse_tls(client: Any, addr: Any) -> None:
        address = _address(addr)
        if hosts is None:
            log.warning(TLS_ADVICE, address)
        else:
            gevent.spawn_later(FALLBACK_WAIT, tell_tls_attempt, hosts, address, time.time(), log)
        end(client)
        client.close()

    def handshake(client: Any, addr: Any) -> Any:
        assert server_tls is not None
        address = _address(addr)
        timeout = client.gettimeout()
        # The wrapper takes the connection over (`client` is detached from it).
        wrapped = server_tls.context().wrap_socket(
            client, server_side=True, do_handshake_on_connect=False
        )
        try:
            wrapped.settimeout(HANDSHAKE_TIMEOUT)
            wrapped.do_handshake()
            wrapped.settimeout(timeout)
        except (OSError, ValueError) as exc:
            # A client without a certificate, with one the CA did not sign or one that
            # has expired: the alert it got names the reason; this line is the operator's.
            log.info("TLS handshake from %s failed: %s", address, exc)
            linger(wrapped)
            return None
        return wrapped

    def refuse_plain(client: Any) -> None:
        with contextlib.suppress(OSError):
            client.sendall(PLAIN_REFUSED)
        linger(client)  # its request is unread: a plain close could reset the answer away

    def peeking_handle(listener: Any, client: Any, addr: Any) -> Any:
        try:
            first = client.recv(1, socket.MSG_PEEK)
        except OSError:
            first = b""
        if first == TLS_HANDSHAKE:
            if server_tls is None:
                return refuse_tls(client, addr)
            client = handshake(client, addr)
            if client is None:
                return None
        elif first and not plain:
            return refuse_plain(client)
        return handle(listener, client, addr)

    worker.handle = peeking_handle


def tell_tls_attempt(hosts: Any, address: str, since: float, log: Any) -> None:
    """After a TLS handshake from `address` at `since`: did it come back over http (a /v2/
    request of that address since, in any worker)? Logged once per client per hour."""
    from redis.exceptions import RedisError

    try:
        hosts.flush()  # this worker's own requests of the last second
        came_back = address in hosts.addresses_seen_since(since)
        if not hosts.first_time_said("http" if came_back else "none", address, SAID_EVERY):
            return
    except RedisError:
        came_back = False  # unknown, and nothing to count with: say it as a problem
    if came_back:
        log.info(TLS_FELL_BACK, address)
    else:
        log.warning(TLS_ADVICE, address)


def zero_copy_sendfile() -> None:
    """Make gevent sockets' sendfile() really use os.sendfile.

    gevent's socket.sendfile() copies the file through userspace in 8 KiB reads and sends, so
    gunicorn's sendfile path for cached blobs ran at about half the speed of a plain sendfile.
    This sends straight from the page cache on the socket's non-blocking descriptor, waits for
    writability through the gevent hub, and yields between chunks so one fast client cannot
    starve the worker's other connections. A local copy still growing (an S3 node's tier)
    is sent the same way: its body (api/v2.py _SpanBody) offers `spans()`, FileSpans of the
    file as it grows.
    """
    import contextlib
    import os
    import socket

    import gevent
    from gevent import _socket3, ssl
    from gevent.socket import wait_write

    from registry.store.driver import FileSpan

    chunk = 4 << 20

    def sendfile_span(self: Any, item: FileSpan) -> None:
        """A span from the page cache, straight to the socket."""
        out_fd = self.fileno()
        while item.sent < item.length:
            try:
                sent = os.sendfile(
                    out_fd, item.fd, item.offset + item.sent, min(chunk, item.length - item.sent)
                )
            except BlockingIOError:
                wait_write(out_fd, timeout=self.gettimeout())
                continue
            if sent == 0:
                return  # the file is shorter than it said: the stream offers it again
            item.sent += sent
            gevent.sleep(0)

    def copy_span(self: Any, item: FileSpan) -> None:
        """A span read and sent through the socket's own sendall: a TLS connection's bytes
        are encrypted in this process (os.sendfile would put them on the wire as they are)."""
        while item.sent < item.length:
            want = min(COPY_CHUNK, item.length - item.sent)
            data = os.pread(item.fd, want, item.offset + item.sent)
            if not data:
                return  # the file is shorter than it said: the stream offers it again
            self.sendall(data)
            item.sent += len(data)
            gevent.sleep(0)  # as between sendfile chunks: the worker's others get a turn

    def send_items(self: Any, items: Any, send_span: Any) -> int:
        """A growing copy's items as they come: bytes sent as they are, FileSpans of its
        file by `send_span`; each span learns how much of it went."""
        total = 0
        for item in items:
            if isinstance(item, FileSpan):
                send_span(self, item)
                total += item.sent
            else:
                self.sendall(item)
                total += len(item)
        return total

    def sendfile(self: Any, file: Any, offset: int = 0, count: int | None = None) -> int:
        spans = getattr(file, "spans", None)
        encrypted = isinstance(self, ssl.SSLSocket)
        if spans is not None:
            return send_items(self, spans(), copy_span if encrypted else sendfile_span)
        if count is None:
            count = os.fstat(file.fileno()).st_size - offset
        span = FileSpan(file.fileno(), offset, count)
        # Cork: only full segments go out while the file is pushed (as nginx's tcp_nopush).
        cork = not encrypted and self.family in (socket.AF_INET, socket.AF_INET6)
        if cork:
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            (copy_span if encrypted else sendfile_span)(self, span)
        finally:
            if cork:
                with contextlib.suppress(OSError):  # the client may be gone
                    self.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            file.seek(offset + span.sent)
        return span.sent

    _socket3.socket.sendfile = sendfile


def cheap_date_header() -> None:
    """gunicorn formats its Date header with email.utils.formatdate on every response (a few
    percent of a cached manifest request); the value changes once a second."""
    import time

    from gunicorn import util

    original = util.http_date
    last: list = [None, ""]

    def http_date(timestamp: float | None = None) -> str:
        if timestamp is not None:
            return original(timestamp)
        now = int(time.time())
        if now != last[0]:
            last[1] = original(now)
            last[0] = now
        return last[1]

    util.http_date = http_date


# A body at most this long goes out in the same send() as its headers; a longer one would
# cost a copy larger than the send it saves.
ONE_SEND_MAX = 64 << 10


class _Gathered:
    """Stands in for a response's socket while gunicorn writes its headers and a small
    body: keeps what it is given, for one send."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def sendall(self: Any, data: Any) -> None:
        self.parts.append(bytes(data))


def headers_with_body() -> None:
    """gunicorn sends a response's headers in one send() and its body in another: two
    syscalls and two segments, each waking the client, for every cached manifest (the two
    sends were a fifth of a worker's time at 3000 manifests/s). A small body written while
    the headers are still unsent now goes out with them, through gunicorn's own write (its
    headers, its bookkeeping), gathered and sent once."""
    from gunicorn.http import wsgi

    original = wsgi.Response.write

    def write(self: Any, arg: Any) -> None:
        small = isinstance(arg, bytes) and len(arg) <= ONE_SEND_MAX
        if self.headers_sent or self.chunked or not small:
            return original(self, arg)
        sock, gathered = self.sock, _Gathered()
        self.sock = gathered
        try:
            original(self, arg)
        finally:
            self.sock = sock
        sock.sendall(b"".join(gathered.parts))

    wsgi.Response.write = write
