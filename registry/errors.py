"""Registry errors as values: every failure a client can see is one of these exceptions.

Each carries its OCI error code and HTTP status; `error_response` renders the OCI body
`{"errors": [{"code", "message", "detail"}]}`. Nothing else in the app builds error bodies.

Docker, podman and containerd print only the status line of a 5xx or 429, never its body, so
those errors also carry a short cause, `reason`, sent as the status line's reason phrase
(HTTP allows any): `503 docker.io unreachable (refused the connection), not cached`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from typing import Any

from flask import Response

log = logging.getLogger(__name__)

# The reason phrase stays one short line of printable ASCII (RFC 9110: no CR, LF or controls).
MAX_REASON = 120
REDIS_DOWN = "cache coordination store (Redis) unavailable"


class RegistryError(Exception):
    """Base class: an OCI error code, an HTTP status and a human message."""

    code = "UNKNOWN"
    status = 500
    default_message = "unknown error"
    # The status line's phrase when no cause is given (5xx and 429 always give one).
    default_reason = "internal error, see the cache's log"

    def __init__(
        self,
        message: str | None = None,
        detail: Any = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
        cause: str | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.detail = detail
        self.headers = dict(headers or {})
        self.reason = reason
        # What happened, without what it means for a client asking for something uncached:
        # the log's word when a cached copy is served anyway.
        self.cause = cause or self.message
        super().__init__(self.message)

    def status_line(self) -> str:
        """`<status> <phrase>`: the cause where one is known (what terminals print)."""
        if self.reason:
            return f"{self.status} {reason_phrase(self.reason)}"
        if self.status >= 500 or self.status == 429:
            return f"{self.status} {self.default_reason}"
        return str(self.status)  # werkzeug adds the standard phrase

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}


class NameInvalid(RegistryError):
    code, status, default_message = "NAME_INVALID", 400, "invalid repository name"


class NameUnknown(RegistryError):
    code, status, default_message = "NAME_UNKNOWN", 404, "repository name not known to registry"


class DigestInvalid(RegistryError):
    code, status, default_message = "DIGEST_INVALID", 400, "provided digest did not match"


class TagInvalid(RegistryError):
    code, status, default_message = "TAG_INVALID", 400, "manifest tag did not match URI"


class HostNotAllowed(RegistryError):
    code, status, default_message = "DENIED", 400, "host name not served here"


class ManifestUnknown(RegistryError):
    code, status, default_message = "MANIFEST_UNKNOWN", 404, "manifest unknown"


class ManifestInvalid(RegistryError):
    code, status, default_message = "MANIFEST_INVALID", 400, "manifest invalid"


class BlobUnknown(RegistryError):
    code, status, default_message = "BLOB_UNKNOWN", 404, "blob unknown to registry"


class RangeInvalid(RegistryError):
    code, status, default_message = "RANGE_INVALID", 416, "requested range not satisfiable"


class PaginationInvalid(RegistryError):
    code, status, default_message = (
        "PAGINATION_NUMBER_INVALID",
        400,
        "invalid number of results requested",
    )


class Denied(RegistryError):
    code, status, default_message = "DENIED", 403, "requested access to the resource is denied"


class Unsupported(RegistryError):
    code, status, default_message = "UNSUPPORTED", 405, "the operation is unsupported"


class NotFound(RegistryError):
    code, status, default_message = "NOT_FOUND", 404, "no such endpoint"


class TooManyRequests(RegistryError):
    code, status, default_message = "TOOMANYREQUESTS", 429, "too many requests"
    default_reason = "upstream rate limit reached, not cached"


class UpstreamError(RegistryError):
    """An upstream registry could not give us content we do not have cached."""

    code, status, default_message = "UNAVAILABLE", 502, "upstream registry failed"
    default_reason = "upstream registry failed, not cached"


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached at all (refused, timed out, DNS)."""

    status = 503
    default_reason = "upstream unreachable, not cached"


class CacheUnavailable(RegistryError):
    """Our own coordination (Redis) or storage failed while a fill was needed."""

    code, status, default_message = "UNAVAILABLE", 503, "cache temporarily unavailable"
    default_reason = "cache temporarily unavailable"


# Our disk failing, as opposed to the network (requests' errors are OSErrors without errno).
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def storage_failure(exc: BaseException) -> CacheUnavailable | None:
    """The 503 for a failure of the storage itself (disk full, read-only, I/O error). Its
    text names the kind of failure only: paths and S3 endpoints are for the log."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        cause = os.strerror(exc.errno)
        return CacheUnavailable(
            f"the cache's storage failed: {cause}", reason=f"cache storage failed: {cause}"
        )
    return None


def redis_unavailable(exc: BaseException) -> CacheUnavailable:
    """The 503 for Redis failing; where it is (host, port) goes to the log only."""
    log.warning("Redis failed: %s", exc)
    return CacheUnavailable("the cache's coordination store is unavailable", reason=REDIS_DOWN)


def reason_phrase(text: str) -> str:
    """`text` as a reason phrase: printable ASCII on one line, at most MAX_REASON long."""
    ascii_only = "".join(c if " " <= c <= "~" else " " for c in text)
    phrase = " ".join(ascii_only.split())
    if len(phrase) > MAX_REASON:
        phrase = phrase[: MAX_REASON - 3].rstrip() + "..."
    return phrase or "error"


def error_response(error: RegistryError, *, head: bool = False) -> Response:
    body = json.dumps({"errors": [error.to_dict()]}).encode()
    response = Response(
        b"" if head else body, status=error.status_line(), mimetype="application/json"
    )
    response.headers["Content-Length"] = str(len(body))
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


# Failures cross processes by class name; the nearest of these in an error's MRO is recorded.
RECORDED_ERRORS: dict[str, type[RegistryError]] = {
    cls.__name__: cls
    for cls in (
        BlobUnknown,
        NameUnknown,
        TooManyRequests,
        UpstreamUnavailable,
        UpstreamError,
        CacheUnavailable,
    )
}
