"""The pull side of the OCI distribution API (/v2/): HTTP only, everything else in pullthrough."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import BinaryIO
from urllib.parse import quote, urlencode

from flask import Blueprint, Response, current_app, g, request
from werkzeug.http import parse_range_header

from registry import accesslog
from registry.clients import Clients, visit
from registry.coordination.limits import client_key
from registry.digests import Digest
from registry.errors import PaginationInvalid, RangeInvalid, Unsupported
from registry.mediatypes import OCI_INDEX
from registry.metrics import Metrics
from registry.names import Target, resolve, route_of
from registry.numbers import is_count
from registry.pullthrough.answers import Blob
from registry.pullthrough.manifests import parse_accept
from registry.pullthrough.service import PullThrough
from registry.store.driver import FileSpan

bp = Blueprint("v2", __name__)

FILE_CHUNK = 1024 * 1024
MAX_PAGE = 10000
READ_ONLY = "pullthrough is a read-only pull-through cache"


def _client() -> str | None:
    """Who a request counts against in the per-client limits: its address, or for IPv6 its
    /64 (one host holds a whole /64 and may use any address in it)."""
    return client_key(request.remote_addr)


def _pullthrough() -> PullThrough:
    return current_app.extensions["pullthrough"]


def _metrics() -> Metrics:
    return current_app.extensions["pullthrough_metrics"]


def _target(name: str) -> Target:
    ns = accesslog.query_ns()
    target = resolve(_pullthrough().settings, name, ns)
    g.registry = target.registry.name
    g.repository = target.repository
    g.route = route_of(name, ns, target)
    return target


@bp.route("/v2/", methods=["GET"])
def ping() -> Response:
    return Response(b"{}", mimetype="application/json")


@bp.route("/v2/<path:name>/manifests/<reference>", methods=["GET", "PUT", "DELETE"])
def manifest(name: str, reference: str) -> Response:
    if request.method != "GET" and request.method != "HEAD":
        raise Unsupported(READ_ONLY)
    g.reference = reference
    target = _target(name)
    accept = parse_accept(request.headers.getlist("Accept"))
    found = _pullthrough().manifest(target, reference, accept, client=_client())
    g.cache = found.cache
    digest = g.digest = str(found.digest)
    count_manifest_answer(
        _pullthrough(),
        _metrics(),
        request.method,
        target.registry.name,
        found.cache,
        len(found.body),
        time.monotonic() - g.started,
    )
    headers = {
        "Content-Type": found.media_type,
        "Content-Length": str(len(found.body)),
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "X-Cache": found.cache.upper(),
    }
    if found.cache == "stale":
        headers["Warning"] = '110 pullthrough "Response is stale: upstream failed"'
    # One Headers build instead of a set() per header: this is the hottest route.
    return Response(found.body, headers=headers, mimetype=None)


def count_manifest_answer(
    pt: PullThrough,
    metrics: Metrics,
    method: str,
    registry: str,
    cache: str,
    size: int,
    seconds: float,
) -> None:
    """The figures of a manifest answered, wherever it was (this route, api/fast.py)."""
    metrics.bound(metrics.cache_requests, "manifest", registry, cache).inc()
    metrics.manifest_answered(method, cache, seconds)
    if method == "GET":
        source = "upstream" if cache == "miss" else "cache"
        metrics.bound(metrics.served_bytes, "manifest", registry, source).inc(size)
        # A pull Docker Hub would have counted, and whether the cache spared it one.
        pt.coord.hourly.note(registry, saved=cache != "miss")


@bp.route("/v2/<path:name>/referrers/<digest>", methods=["GET"])
def referrers(name: str, digest: str) -> Response:
    """OCI 1.1 referrers: an image index of what is attached to the manifest `digest`
    (empty when nothing is), `?artifactType=` filtered."""
    g.reference = digest
    target = _target(name)
    found = _pullthrough().referrers(target, Digest.parse(digest), client=_client())
    g.cache = found.cache
    artifact_type = request.args.get("artifactType")
    body = found.index(artifact_type)
    headers = {
        "Content-Type": OCI_INDEX,
        "Content-Length": str(len(body)),
        "X-Cache": found.cache.upper(),
    }
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    if found.cache == "stale":
        headers["Warning"] = '110 pullthrough "Response is stale: upstream failed"'
    return Response(body, headers=headers, mimetype=None)


@bp.route("/v2/<path:name>/blobs/<digest>", methods=["GET", "DELETE"])
def blob(name: str, digest: str) -> Response:
    if request.method == "DELETE":
        raise Unsupported(READ_ONLY)
    g.reference = digest
    target = _target(name)
    head = request.method == "HEAD"
    found = _pullthrough().blob(target, Digest.parse(digest), head=head, client=_client())
    g.cache = "joined" if found.joined else found.cache
    g.digest = str(found.digest)
    _metrics().cache_requests.labels("blob", target.registry.name, found.cache).inc()
    byte_range = parse_range(request.headers.get("Range"), found.size)
    start, end = byte_range or (0, found.size - 1)
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Length": str(end - start + 1),
        "Docker-Content-Digest": str(found.digest),
        "ETag": f'"{found.digest}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000, immutable",
        "X-Cache": found.cache.upper(),
    }
    if byte_range:
        headers["Content-Range"] = f"bytes {start}-{end}/{found.size}"
    status = 206 if byte_range else 200
    if head:
        response = Response(b"", status=status)
        response.headers.update(headers)  # after the body, which would reset Content-Length
        return response
    if found.redirect is not None:
        # The store serves the bytes (a presigned URL); clients repeat Range themselves.
        response = Response(b"", status=307)
        response.headers.update(
            {"Location": found.redirect, "Docker-Content-Digest": str(found.digest)}
        )
        return response
    chunks = None
    wrapper = request.environ.get("wsgi.file_wrapper")
    sendfile = wrapper is not None and "gunicorn.socket" in request.environ
    if found.stream is not None:
        # Wait for the first byte here, where a failed fill is still an OCI error with its
        # status: once the headers are out it can only cut the connection short.
        # Its log line is written when the last byte goes (_Sent), once there is a body:
        # a first byte that fails is the error's answer, logged as any other.
        if wrapper is not None and sendfile and found.spans is not None:
            spans = _primed(found.spans(start, end))
            sent = _Sent(_metrics(), target.registry.name, status)
            body = _SpanBody(spans, sent, _source(found))
            return Response(
                wrapper(body, FILE_CHUNK), status=status, headers=headers, direct_passthrough=True
            )
        chunks = _primed(found.stream(start, end))
    sent = _Sent(_metrics(), target.registry.name, status)
    return Response(
        _body(found, start, end, sent, chunks),
        status=status,
        headers=headers,
        direct_passthrough=True,
    )


def _primed(chunks: Iterator) -> Iterator:
    """`chunks` with its first item already produced (its errors raised now); closing it
    closes `chunks` (the stream's open file goes then, not when collected)."""
    first = next(chunks, None)
    if first is None:
        return chunks

    def rest() -> Iterator:
        try:
            yield first
            yield from chunks
        finally:
            chunks.close()  # type: ignore[attr-defined]

    return rest()


class _Sent:
    """Counts and logs a blob response's bytes and time when its last byte has gone (or it
    broke off). Runs after the request context: it carries what the log line and the
    Hosts page need."""

    def __init__(self, metrics: Metrics, registry: str, status: int) -> None:
        self.metrics = metrics
        self.registry = registry
        self.status = status
        self.pending = accesslog.Pending()
        self.visit = visit()
        self.cache = g.get("cache")
        self.clients: Clients = current_app.extensions["pullthrough_clients"]
        g.log_when_sent = True

    def done(self, source: str, size: int) -> None:
        seconds = time.monotonic() - self.pending.started
        self.metrics.blob_sent(self.registry, source, size, seconds)
        self.pending.write(self.status, size)
        self.clients.done(self.visit, self.status, size, self.cache, None)


def _source(found: Blob) -> str:
    # A miss counts as upstream bytes even when a fast fill committed before we sent them.
    return "upstream" if found.cache == "miss" else "cache"


class _SpanBody:
    """A growing local copy's bytes as gunicorn's file wrapper sends them: with sendfile,
    its `spans()` as they come (serving.zero_copy_sendfile), never read into memory; else
    `read()`. Counts and logs what went when gunicorn closes it."""

    def __init__(self, items: Iterator[bytes | FileSpan], sent: _Sent, source: str) -> None:
        self._items = items
        self._sent = sent
        self._source = source
        self.count = 0
        # The span being sent when the client went: the part of it that left counts.
        self._sending: bytes | FileSpan | None = None
        # gunicorn seeks the descriptor it is given before and after sendfile.
        self._null = os.open(os.devnull, os.O_RDONLY)

    def fileno(self) -> int:
        return self._null

    def spans(self) -> Iterator[bytes | FileSpan]:
        for item in self._items:
            self._sending = item
            yield item
            self._sending = None
            self.count += item.sent if isinstance(item, FileSpan) else len(item)

    def read(self, size: int = FILE_CHUNK) -> bytes:
        for item in self._items:
            if not isinstance(item, FileSpan):
                self.count += len(item)
                return item
            data = os.pread(item.fd, min(size, item.length), item.offset)
            item.sent = len(data)
            if data:
                self.count += len(data)
                return data
        return b""

    def close(self) -> None:
        if isinstance(self._sending, FileSpan):
            self.count += self._sending.sent
        close = getattr(self._items, "close", None)
        if close is not None:
            close()  # the stream's own clean-up (its open file) now
        os.close(self._null)
        self._sent.done(self._source, self.count)


def _body(
    found: Blob, start: int, end: int, sent: _Sent, chunks: Iterator[bytes] | None
) -> Iterable[bytes]:
    source = _source(found)
    if chunks is not None:
        return _counted(chunks, sent, source)
    assert found.open_file is not None
    handle = found.open_file()
    handle.seek(start)
    wrapper = request.environ.get("wsgi.file_wrapper")
    if wrapper is not None and "gunicorn.socket" in request.environ and _has_fd(handle):
        # gunicorn sends at most Content-Length bytes from the current offset (sendfile), and
        # closes the wrapper after the last one or once the client has gone: that is when
        # the bytes that left are counted.
        return _counting_wrapper(wrapper)(
            _Progress(handle, start), FILE_CHUNK, sent=sent, size=end - start + 1, source=source
        )
    return _counted(_read_range(handle, start, end), sent, source)


def _has_fd(handle: BinaryIO) -> bool:
    try:
        handle.fileno()
        return True
    except (OSError, AttributeError):  # io.UnsupportedOperation is an OSError
        return False


def _counted(chunks: Iterator[bytes], sent: _Sent, source: str) -> Iterator[bytes]:
    """`chunks`, counting a chunk once the server asks for the next one: it has written it
    by then. A client that goes mid-chunk leaves that chunk uncounted."""
    size = 0
    try:
        for chunk in chunks:
            yield chunk
            size += len(chunk)
    finally:
        sent.done(source, size)


class _Progress:
    """A blob's open file as the server sends it, knowing how much of it has left.

    Every sendfile (gevent's, the standard library's, serving.zero_copy_sendfile) seeks the
    file to where it got, whether it finished or the client went; a server that reads the
    file instead has sent what it read before asking for more."""

    def __init__(self, handle: BinaryIO, start: int) -> None:
        self._handle = handle
        self._start = start
        self.sent = 0

    def fileno(self) -> int:
        return self._handle.fileno()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._handle.seek(offset, whence)
        self.sent = max(self.sent, position - self._start)
        return position

    def tell(self) -> int:
        return self._handle.tell()

    def read(self, size: int = -1) -> bytes:
        self.sent = max(self.sent, self._handle.tell() - self._start)
        return self._handle.read(size)

    def close(self) -> None:
        self._handle.close()


_WRAPPERS: dict[type, type] = {}


def _counting_wrapper(base: type) -> type:
    """gunicorn's file wrapper (so it still uses sendfile) that reports on close."""
    if base not in _WRAPPERS:

        class Counting(base):
            def __init__(
                self, filelike: _Progress, blksize: int, *, sent: _Sent, size: int, source: str
            ) -> None:
                super().__init__(filelike, blksize)
                # The base sets `self.close = filelike.close` per instance: replace that.
                self.close = lambda: self._count_and_close(filelike, sent, size, source)

            @staticmethod
            def _count_and_close(filelike: _Progress, sent: _Sent, size: int, source: str) -> None:
                sent.done(source, min(filelike.sent, size))
                filelike.close()

        _WRAPPERS[base] = Counting
    return _WRAPPERS[base]


def _read_range(handle: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    with handle:
        remaining = end - start + 1
        while remaining > 0:
            data = handle.read(min(FILE_CHUNK, remaining))
            if not data:
                return
            remaining -= len(data)
            yield data


@bp.route("/v2/<path:name>/blobs/uploads/", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
@bp.route(
    "/v2/<path:name>/blobs/uploads/<path:session>",
    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
)
def uploads(name: str, session: str | None = None) -> Response:
    raise Unsupported(READ_ONLY)


@bp.route("/v2/<path:name>/tags/list", methods=["GET"])
def tags(name: str) -> Response:
    target = _target(name)
    n, last = _pagination()
    names, more = _pullthrough().tags(target, n, last, client=_client())
    return _listing({"name": name, "tags": names}, f"/v2/{name}/tags/list", n, names, more)


@bp.route("/v2/_catalog", methods=["GET"])
def catalog() -> Response:
    n, last = _pagination()
    names, more = _pullthrough().catalog(n, last)
    return _listing({"repositories": names}, "/v2/_catalog", n, names, more)


def _pagination() -> tuple[int | None, str | None]:
    raw_n = request.args.get("n")
    n = None
    if raw_n is not None:
        if not is_count(raw_n) or len(raw_n) > 6:
            raise PaginationInvalid(detail={"n": raw_n[:50]})
        n = min(int(raw_n), MAX_PAGE)
    last = request.args.get("last") or None
    if last is not None and len(last) > 512:
        raise PaginationInvalid("invalid last", detail={"last": last[:50]})
    return n, last


def _listing(body: dict, path: str, n: int | None, names: list[str], more: bool) -> Response:
    response = Response(json.dumps(body), mimetype="application/json")
    if more and names:
        query = {"n": str(n), "last": names[-1]}
        ns = accesslog.query_ns()
        if ns:
            query["ns"] = ns
        response.headers["Link"] = f'<{quote(path)}?{urlencode(query)}>; rel="next"'
    return response


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One `bytes=` range as (start, end) inclusive; None means serve the whole blob.

    werkzeug parses the header (None for what is malformed). Multiple ranges, other units
    and malformed headers are ignored (RFC 9110 lets a server do so); a suffix longer than
    the blob means all of it; a range that starts past the end is a 416.
    """
    parsed = parse_range_header(header) if header and len(header) <= 64 else None
    if parsed is None or parsed.units != "bytes" or len(parsed.ranges) != 1:
        return None
    start, stop = parsed.ranges[0]
    if start < 0:  # the last -start bytes
        if size == 0:
            raise _unsatisfiable(size)
        return max(size + start, 0), size - 1
    if start >= size:
        raise _unsatisfiable(size)
    return start, size - 1 if stop is None else min(stop, size) - 1


def _unsatisfiable(size: int) -> RangeInvalid:
    return RangeInvalid(headers={"Content-Range": f"bytes */{size}"})
