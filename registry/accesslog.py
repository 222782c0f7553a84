"""The access log: one line per request, answering "who pulled what", written to stderr.

Fields, in this order: client (address), method, registry, repository, reference (the tag or
digest asked for), digest (the one served), ns (containerd's `?ns=`), status, bytes (really
sent: a blob's line is written once its last byte has gone, by sendfile too), ms (from the
request's first byte to the response's last), cache (hit | miss | joined | stale |
revalidated), path for requests that name no repository, and user (the name of the
client's verified certificate; last, so that parsers of the earlier fields keep working). A
field that does not apply is `-`. `PULLTHROUGH_LOG_FORMAT=json` writes the same fields as
one JSON object a line.

A line per request is on the hot path (thousands a second per worker), and the logging
module's record, formatter and lock cost about a tenth of a cached manifest request. The
line keeps the logging module's shape and honours the `registry.access` logger's level
(`PULLTHROUGH_LOG_LEVEL=warning` turns it off), but is formatted once and written once,
with the timestamp string reused within a second.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_logger = logging.getLogger("registry.access")
_stamp = (-1, "")
_json = False

FIELDS = (
    "client",
    "method",
    "registry",
    "repository",
    "reference",
    "digest",
    "ns",
    "status",
    "bytes",
    "ms",
    "cache",
    "path",
    "user",
)


def configure(log_format: str) -> None:
    """`text` (key=value) or `json`: logs.configure passes PULLTHROUGH_LOG_FORMAT."""
    global _json
    _json = log_format == "json"


def enabled() -> bool:
    return _logger.isEnabledFor(logging.INFO)


def _value(text: str | None) -> str:
    # Paths, names and `ns` come from clients: quote whatever could split or forge a line.
    if text is None:
        return "-"
    if text and text.isprintable() and " " not in text and '"' not in text:
        return text
    return json.dumps(text)


def request(
    client: str | None,
    method: str,
    registry: str | None,
    repository: str | None,
    reference: str | None,
    digest: str | None,
    ns: str | None,
    status: int,
    size: int,
    ms: float,
    cache: str | None,
    path: str | None,
    user: str | None = None,
) -> None:
    """One request's line (FIELDS); None is written as `-`, or left out in JSON."""
    if not _logger.isEnabledFor(logging.INFO):
        return
    if _json:
        values = (client, method, registry, repository, reference, digest, ns, status, size,
                  round(ms, 1), cache, path, user)  # fmt: skip
        data = {k: v for k, v in zip(FIELDS, values, strict=True) if v is not None}
        write(json.dumps({"event": "request", **data}, separators=(",", ":")))
        return
    # One f-string: this runs for every cached manifest request.
    write(
        f"request client={client or '-'} method={method} registry={registry or '-'} "
        f"repository={_value(repository)} reference={_value(reference)} "
        f"digest={digest or '-'} ns={_value(ns)} status={status} bytes={size} "
        f"ms={ms:.1f} cache={cache or '-'} path={_value(path)} user={_value(user)}"
    )


def query_ns() -> str | None:
    """The request's `?ns=` (containerd's), read once: most requests carry no query string,
    and a missing key costs werkzeug an exception."""
    from flask import g, request

    if "ns" not in g:
        query = request.environ.get("QUERY_STRING")
        g.ns = request.args.get("ns") if query else None
    return g.ns


class Pending:
    """A request's fields read in its context, for a line written later: a blob's line goes
    out once its last byte has (after the request context is gone)."""

    __slots__ = ("fields", "started")

    def __init__(self) -> None:
        from flask import g, request

        self.started = g.get("started") or time.monotonic()
        repository = g.get("repository")
        self.fields = (
            request.remote_addr,
            request.method,
            g.get("registry"),
            repository,
            g.get("reference"),
            g.get("digest"),
            query_ns(),
            g.get("cache"),
            None if repository else request.path,
            request.environ.get("REMOTE_USER"),
        )

    def write(self, status: int, size: int) -> None:
        client, method, registry, repository, reference, digest, ns, cache, path, user = self.fields
        ms = (time.monotonic() - self.started) * 1000
        request(
            client, method, registry, repository, reference, digest, ns, status, size, ms,
            cache, path, user,
        )  # fmt: skip


def write(message: str) -> None:
    global _stamp
    if not _logger.isEnabledFor(logging.INFO):
        return
    now = time.time()
    second = int(now)
    if _stamp[0] != second:
        _stamp = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
    millis = int((now - second) * 1000)
    if _json and message.startswith("{"):
        # One JSON object per line: the time and process go inside it.
        line = (
            f'{{"time":"{_stamp[1]},{millis:03d}","pid":{os.getpid()},"level":"INFO",'
            f'"logger":"registry.access",{message[1:]}\n'
        )
    else:
        line = f"{_stamp[1]},{millis:03d} [{os.getpid()}] INFO registry.access {message}\n"
    sys.stderr.write(line)
