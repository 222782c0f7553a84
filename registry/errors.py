"""Registry errors as values: every failure a client can see is one of these exceptions.

Each carries its OCI error code and HTTP status; `error_response` renders the OCI body
`{"errors": [{"code", "message", "detail"}]}`. Nothing else in the app builds error bodies.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from flask import Response


class RegistryError(Exception):
    """Base class: an OCI error code, an HTTP status and a human message."""

    code = "UNKNOWN"
    status = 500
    default_message = "unknown error"

    def __init__(
        self,
        message: str | None = None,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.detail = detail
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}


class NameInvalid(RegistryError):
    code, status, default_message = "NAME_INVALID", 400, "invalid repository name"


class NameUnknown(RegistryError):
    code, status, default_message = "NAME_UNKNOWN", 404, "repository name not known to registry"


class TagInvalid(RegistryError):
    code, status, default_message = "TAG_INVALID", 400, "manifest tag did not match URI"


class DigestInvalid(RegistryError):
    code, status, default_message = "DIGEST_INVALID", 400, "provided digest did not match"


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


class Unsupported(RegistryError):
    code, status, default_message = "UNSUPPORTED", 405, "the operation is unsupported"


class NotFound(RegistryError):
    code, status, default_message = "NOT_FOUND", 404, "no such endpoint"


class TooManyRequests(RegistryError):
    code, status, default_message = "TOOMANYREQUESTS", 429, "too many requests"


class UpstreamError(RegistryError):
    """An upstream registry could not give us content we do not have cached."""

    code, status, default_message = "UNAVAILABLE", 502, "upstream registry failed"


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached at all (refused, timed out, DNS)."""

    status = 503


class CacheUnavailable(RegistryError):
    """Our own coordination (Redis) or storage failed while a fill was needed."""

    code, status, default_message = "UNAVAILABLE", 503, "cache temporarily unavailable"


# Our disk failing, as opposed to the network (requests' errors are OSErrors without errno).
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def storage_failure(exc: BaseException) -> CacheUnavailable | None:
    """The 503 for a failure of the storage itself (disk full, read-only, I/O error)."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return CacheUnavailable(f"the storage failed: {exc.strerror or os.strerror(exc.errno)}")
    return None


def error_response(error: RegistryError, *, head: bool = False) -> Response:
    body = json.dumps({"errors": [error.to_dict()]}).encode()
    response = Response(b"" if head else body, status=error.status, mimetype="application/json")
    response.headers["Content-Length"] = str(len(body))
    for name, value in error.headers.items():
        response.headers[name] = value
    return response
