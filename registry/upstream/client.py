"""UpstreamClient: the client of one upstream registry, its registry API calls (manifests,
blobs and their ranges, referrers, tags) over its connection (connection.py: timeouts,
authentication, the breaker, redirects, bounded answers; answers.py parses what comes back).
Knows nothing about the store."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urljoin, urlsplit

import requests

from registry.digests import Digest
from registry.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
)
from registry.numbers import count_or_none
from registry.upstream.answers import content_range, media_type, unsatisfiable_size, what
from registry.upstream.connection import (
    ACCEPT_ALL,
    ACCEPT_INDEX,
    BLOB_READ,
    MAX_REFERRER_PAGES,
    UpstreamConnection,
    UpstreamDenied,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ManifestResponse:
    body: bytes
    media_type: str
    digest: Digest | None  # upstream's Docker-Content-Digest, if it sent one


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: Digest | None
    media_type: str
    size: int | None


class BlobStream:
    """An open upstream blob response: `offset` is where its bytes start in the blob."""

    def __init__(
        self,
        response: requests.Response | None,
        offset: int,
        total: int | None,
        ranged: bool = False,
    ) -> None:
        # No response: the bytes held from `offset` on are already the whole blob.
        self.response = response
        self.offset = offset
        self.total = total
        self.ranged = ranged  # a 206 with exactly the range asked for

    def chunks(self) -> Iterator[bytes]:
        if self.response is None:
            return
        # decode_content=False: layers are served byte-exact even if someone sets an encoding.
        raw = self.response.raw
        while data := raw.read1(BLOB_READ, decode_content=False):
            yield data

    def close(self) -> None:
        if self.response is not None:
            self.response.close()


class UpstreamClient(UpstreamConnection):
    """The registry API of one upstream: manifests, blobs and their ranges, referrers, tags."""

    # -- public calls ------------------------------------------------------------------------
    def get_manifest(self, repository: str, reference: str) -> ManifestResponse:
        """The manifest, asked for with every manifest type (what a cache stores for all its
        clients must not depend on one client's Accept)."""
        response = self._request(
            "GET", repository, f"manifests/{reference}", headers=ACCEPT_ALL, stream=True
        )
        with response:
            self._raise_for_status(response, repository, ManifestUnknown, what(reference))
            body = self._read_bounded(response, repository)
        return ManifestResponse(
            body=body, media_type=media_type(response), digest=self._digest_header(response)
        )

    def head_manifest(self, repository: str, reference: str) -> ManifestHead:
        response = self._request("HEAD", repository, f"manifests/{reference}", headers=ACCEPT_ALL)
        self._raise_for_status(response, repository, ManifestUnknown, what(reference))
        length = response.headers.get("Content-Length")
        return ManifestHead(
            digest=self._digest_header(response),
            media_type=media_type(response),
            size=count_or_none(length),
        )

    def blob_size(self, repository: str, digest: str) -> int | None:
        """The blob's size if upstream has it in this repository, else None."""
        try:
            response = self._request("HEAD", repository, f"blobs/{digest}", follow=True)
        except UpstreamDenied:
            return None
        if response.status_code in (401, 403, 404):
            return None
        self._raise_for_status(response, repository, BlobUnknown, f"blob {digest}")
        length = response.headers.get("Content-Length", "")
        return count_or_none(length)

    def open_blob(self, repository: str, digest: str, offset: int = 0) -> BlobStream:
        """Start a blob download at `offset`; BlobStream.offset says where it really starts."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self._request(
            "GET",
            repository,
            f"blobs/{digest}",
            headers=headers,
            stream=True,
            follow=True,
            blob=True,
        )
        if offset and response.status_code == 206:
            start, _end, total = content_range(response.headers.get("Content-Range"))
            if start == offset:
                return BlobStream(response, offset, total)
            response.close()
            response = self._request(
                "GET", repository, f"blobs/{digest}", stream=True, follow=True, blob=True
            )
        elif offset and response.status_code == 416:
            # `bytes */SIZE`: nothing lies past the offset. A fill that stopped after its last
            # byte (before its commit) left the whole blob: the caller verifies and commits it.
            total = unsatisfiable_size(response.headers.get("Content-Range"))
            response.close()
            if total == offset:
                return BlobStream(None, offset, total)
            response = self._request(
                "GET", repository, f"blobs/{digest}", stream=True, follow=True, blob=True
            )
        return self._whole_blob(response, repository, digest)

    def _whole_blob(self, response: requests.Response, repository: str, digest: str) -> BlobStream:
        """A `200`'s whole blob from its first byte; any other answer is an error."""
        if response.status_code != 200:
            response.close()
            self._raise_for_status(response, repository, BlobUnknown, f"blob {digest}")
            raise self._failure(f"answered {response.status_code} for blob {digest}")
        return BlobStream(response, 0, count_or_none(response.headers.get("Content-Length")))

    def open_range(
        self, repository: str, digest: str, start: int, end: int, *, fallback: bool = True
    ) -> BlobStream:
        """Bytes [start, end] of a blob (`end` past the blob's last byte is the rest of it).

        `ranged` when upstream answered 206 with exactly that range (its total then known);
        a 200 is upstream ignoring Range: the whole blob from 0, never fetched twice by the
        caller. A 416 whose `bytes */SIZE` is `start` says nothing lies past `start` (no
        response). A range upstream got wrong is asked for again without Range, unless not
        `fallback` (a later range of a parallel fill: that is an error, not a whole blob)."""
        response = self._request(
            "GET",
            repository,
            f"blobs/{digest}",
            headers={"Range": f"bytes={start}-{end}"},
            stream=True,
            follow=True,
            blob=True,
        )
        if response.status_code == 206:
            first, last, total = content_range(response.headers.get("Content-Range"))
            if first == start and total and last == min(end, total - 1):
                return BlobStream(response, start, total, ranged=True)
            response.close()
            if not fallback:
                raise self._failure(f"answered the range {start}-{end} of {digest} with another")
            return self.open_blob(repository, digest, 0)
        if response.status_code == 416:
            total = unsatisfiable_size(response.headers.get("Content-Range"))
            response.close()
            if total is not None and total == start:
                return BlobStream(None, start, total, ranged=True)
            if not fallback:
                raise self._failure(f"refused the range {start}-{end} of {digest}")
            return self.open_blob(repository, digest, 0)
        return self._whole_blob(response, repository, digest)

    def list_referrers(self, repository: str, digest: str, max_bytes: int) -> list[bytes] | None:
        """Every page of upstream's referrers of `digest` (image index bodies, `Link` pages
        followed on the same host), at most `max_bytes` all together; None when upstream has
        no referrers API (a 404)."""
        path, params = f"referrers/{digest}", None
        pages: list[bytes] = []
        left = max_bytes
        while len(pages) < MAX_REFERRER_PAGES:
            response = self._request(
                "GET", repository, path, params=params, headers=ACCEPT_INDEX, stream=True
            )
            with response:
                if response.status_code == 404 and not pages:
                    return None
                self._raise_for_status(
                    response, repository, ManifestUnknown, f"referrers of {digest}"
                )
                page = self._read_bounded(
                    response, repository, "referrers", left,
                    over=f"sent more than {max_bytes} bytes of referrers",
                )  # fmt: skip
                left -= len(page)
                pages.append(page)
                following = response.links.get("next", {}).get("url")
            if not following:
                return pages
            path, params = self._next_referrers_page(response.url, following, repository, digest)
        raise self._failure(f"sent more than {MAX_REFERRER_PAGES} pages of referrers")

    def _next_referrers_page(
        self, current: str, link: str, repository: str, digest: str
    ) -> tuple[str, dict[str, str]]:
        """The path and query of a `Link: <...>; rel="next"`: the same list (upstream, its
        repository and digest) with another query, or refused."""
        url = urlsplit(urljoin(current, link))
        base = urlsplit(self.registry.url)
        prefix = urlsplit(self._url(repository, "referrers/")).path
        same_list = url.path == f"{prefix}{digest}"
        if (url.scheme, url.netloc) != (base.scheme, base.netloc) or not same_list:
            raise self._failure("pointed the next page of referrers elsewhere")
        return f"referrers/{digest}", dict(parse_qsl(url.query))

    def list_tags(self, repository: str, n: int | None, last: str | None) -> dict:
        params = {}
        if n is not None:
            params["n"] = str(n)
        if last:
            params["last"] = last
        response = self._request("GET", repository, "tags/list", params=params, stream=True)
        with response:
            self._raise_for_status(response, repository, NameUnknown, "")
            body = self._read_bounded(response, repository, "a tag list")
        try:
            data = json.loads(body)
        except ValueError:
            raise self._failure("answered tags/list with a body that is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("tags") or [], list):
            raise self._failure("answered tags/list with an unexpected body")
        return data
