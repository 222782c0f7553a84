"""The referrers of a manifest (OCI 1.1): signatures, SBOMs and attestations attached to it.

Asked of upstream's referrers API (`GET /v2/<name>/referrers/<digest>`, every `Link` page);
an upstream without it (a 404 there, as distribution 2.8 answers) is asked for the referrers
tag schema instead: the image index tagged `<alg>-<hex>`. The answer, unfiltered, is stored
as an OCI image index (a blob like any manifest) with a record of when upstream was asked
(the store's `_referrers/` file, the shape of a tag's); it is served for the registry's
`referrers_ttl` (default 5 min) by every worker and node, then asked again, and served stale
(`Warning: 110`) while upstream fails. `?artifactType=` is filtered here, from the whole
list, so every filter shares one cached answer.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from registry.coordination import Lease
from registry.digests import Digest, sha256_of
from registry.errors import ManifestUnknown, RegistryError, TooManyRequests, UpstreamError
from registry.mediatypes import OCI_INDEX
from registry.names import Target
from registry.store import ContentStore
from registry.store.content import TagRecord
from registry.upstream.client import UpstreamClient

log = logging.getLogger(__name__)

# What a descriptor in a referrers index may carry (others are dropped).
DESCRIPTOR_FIELDS = ("mediaType", "digest", "size", "artifactType", "annotations")


@dataclass(frozen=True)
class Referrers:
    body: bytes  # the whole list as an image index, as stored (index_body)
    cache: str  # hit, miss or stale (as a manifest's)

    @cached_property
    def descriptors(self) -> list[dict[str, Any]]:
        try:
            return descriptors_of(self.body)
        except ValueError:
            return []

    def index(self, artifact_type: str | None = None) -> bytes:
        """The image index a client gets, filtered to `artifact_type` when given (the stored
        bytes as they are when not)."""
        if artifact_type is None:
            return self.body
        return index_body([d for d in self.descriptors if d.get("artifactType") == artifact_type])


def index_body(descriptors: list[dict[str, Any]]) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}, indent=2
    ).encode()


def descriptors_of(body: bytes) -> list[dict[str, Any]]:
    """The well-formed descriptors of an index (from upstream: never trusted whole)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    entries = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError("not an image index")
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("mediaType"), str):
            continue
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            continue
        try:
            Digest.parse(str(entry.get("digest")))
        except RegistryError:
            continue
        annotations = entry.get("annotations")
        if annotations is not None and not isinstance(annotations, dict):
            continue
        out.append({k: entry[k] for k in DESCRIPTOR_FIELDS if k in entry})
    return out


class ReferrersCache:
    def __init__(
        self,
        store: ContentStore,
        upstream: Callable[[Target], UpstreamClient],
        spend: Callable[[str | None], None],
        count_stored: Callable[[int], None],
        clock: Callable[[], float],
        max_stale: float | None,
        lease: Callable[[Target, Digest], Lease],
        wait: float,
        *,
        max_bytes: int,
        max_descriptors: int,
        fetches: int,
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.max_descriptors = max_descriptors
        self.max_fetches = fetches
        self._fetching = threading.BoundedSemaphore(fetches)
        self.lease = lease  # the lease of one list's upstream request
        self.wait = wait  # how long a request waits for another's
        self.upstream = upstream
        self.spend = spend
        self.count_stored = count_stored
        self.clock = clock
        self.max_stale = max_stale

    def _cached(self, target: Target, subject: Digest) -> tuple[bytes | None, float]:
        """The stored list (None: none, or damaged) and its age."""
        record = self.store.read_referrers(target, subject)
        if record is None:
            return None, 0.0
        return self.store.read_manifest(record.digest), self.clock() - record.validated

    def get(self, target: Target, subject: Digest, client: str | None = None) -> Referrers:
        cached, age = self._cached(target, subject)
        ttl = target.registry.referrers_ttl
        if cached is not None and age < ttl:
            return Referrers(cached, "hit")
        # One upstream request per list at a time, across workers and nodes: the others wait
        # for it and serve what it stored.
        lease = self.lease(target, subject)
        try:
            acquired = lease.acquire()
            contended = not acquired
        except RegistryError:
            acquired = contended = False  # no coordination: ask anyway
        if contended:
            lease.wait_released(self.wait)
            again, again_age = self._cached(target, subject)
            if again is not None and again_age < ttl:
                return Referrers(again, "hit")
        try:
            if not self._fetching.acquire(timeout=self.wait):
                message = (
                    f"{self.max_fetches} referrers lists are being fetched from upstream by "
                    "this worker; retry in 1 s"
                )
                raise TooManyRequests(message, headers={"Retry-After": "1"}, reason=message)
            try:
                return self._refresh(target, subject, client, cached, age)
            finally:
                self._fetching.release()
        finally:
            if acquired:
                lease.release()

    def _refresh(
        self,
        target: Target,
        subject: Digest,
        client: str | None,
        cached: bytes | None,
        age: float,
    ) -> Referrers:
        try:
            descriptors = self._ask(target, subject, client)
        except RegistryError as exc:
            stale_ok = self.max_stale is None or age <= self.max_stale
            if cached is not None and stale_ok and not isinstance(exc, ManifestUnknown):
                log.warning("serving stale referrers of %s@%s: %s", target, subject, exc.cause)
                return Referrers(cached, "stale")
            raise
        body = index_body(descriptors)
        if not descriptors and not self.store.is_linked(target, subject):
            # Nothing, of a manifest this repository has not served: nothing to keep (a
            # made-up repository or digest writes nothing to disk).
            return Referrers(body, "miss")
        digest = sha256_of(body)
        if self.store.put_verified_bytes(digest, body):
            self.count_stored(len(body))
        self.store.write_referrers(target, subject, TagRecord(digest, OCI_INDEX, self.clock()))
        return Referrers(body, "miss")

    def _ask(self, target: Target, subject: Digest, client: str | None) -> list[dict]:
        upstream = self.upstream(target)
        self.spend(client)
        pages = upstream.list_referrers(target.repository, str(subject), self.max_bytes)
        if pages is not None:
            descriptors: list[dict] = []
            while pages:
                descriptors.extend(self._parse(pages.pop(0), upstream))
                if len(descriptors) > self.max_descriptors:
                    name = upstream.registry.name
                    raise UpstreamError(
                        f"upstream {name} sent more than {self.max_descriptors} referrers of "
                        f"{subject}",
                        reason=f"{name} sent too many referrers, not cached",
                    )
            return descriptors
        # No referrers API: the referrers tag schema. No tag means no referrers.
        self.spend(client)
        try:
            fetched = upstream.get_manifest(target.repository, f"{subject.algorithm}-{subject.hex}")
        except ManifestUnknown:
            return []
        return self._parse(fetched.body, upstream)

    @staticmethod
    def _parse(body: bytes, upstream: UpstreamClient) -> list[dict]:
        try:
            return descriptors_of(body)
        except ValueError as exc:
            name = upstream.registry.name
            raise UpstreamError(
                f"upstream {name} answered a referrers request with {exc}",
                reason=f"{name} sent referrers that are not an image index",
            ) from None
