"""Pull-through: the only module that composes the upstream clients, the store and Redis.

Handlers ask it for a manifest, a blob, a tag list or the catalog and cannot tell whether the
answer came from disk or upstream. Data flows one way: api -> pullthrough -> store |
coordination -> upstream -> store.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO, TypeVar

from redis.exceptions import RedisError

from registry.config import Settings
from registry.coordination import Coordination, missing_key
from registry.digests import Digest, looks_like_digest, sha256_of
from registry.errors import (
    BlobUnknown,
    CacheUnavailable,
    DigestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    UpstreamError,
    redis_unavailable,
)
from registry.mediatypes import KNOWN_MANIFEST_TYPES
from registry.metrics import Metrics
from registry.names import Target, catalog_name, is_tag, validate_tag
from registry.pullthrough.fill import BlobFiller
from registry.pullthrough.manifests import InvalidManifest, accepts, parse_manifest
from registry.pullthrough.policy import SignaturePolicy
from registry.pullthrough.presence import Presence
from registry.pullthrough.referrers import Referrers, ReferrersCache
from registry.pullthrough.tiering import TierServing
from registry.store import ContentStore, TagRecord
from registry.store.driver import FileSpan
from registry.store.tier import LocalTier
from registry.upstream.client import UpstreamClient, UpstreamDenied

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a request waits for another process's fetch of the same tag before doing it itself.
TAG_WAIT = 0.05


@dataclass(frozen=True, slots=True)
class Manifest:
    body: bytes
    digest: Digest
    media_type: str
    # hit: served from disk; miss: fetched; revalidated: upstream confirmed the cached tag;
    # stale: upstream failed and the cached tag was served anyway.
    cache: str


@dataclass
class Blob:
    """A blob ready to serve: either a committed file or a fill in progress."""

    digest: Digest
    size: int
    cache: str  # "hit" or "miss"
    open_file: Callable[[], BinaryIO] | None = None
    stream: Callable[[int, int], Iterator[bytes]] | None = None
    # The stream with a local file's bytes as FileSpans (for a sender with sendfile).
    spans: Callable[[int, int], Iterator[bytes | FileSpan]] | None = None
    redirect: str | None = None  # a presigned URL of the store that serves the bytes
    joined: bool = False  # a miss that streams another request's fill


@dataclass(frozen=True, slots=True)
class Prefetched:
    """A blob brought into the cache with nobody to send it to (warm, the follower)."""

    size: int
    miss: bool  # it was not cached before this call
    joined: bool  # a fill someone else started brought it


class PullThrough:
    def __init__(
        self,
        settings: Settings,
        store: ContentStore,
        coordination: Coordination,
        upstreams: dict[str, UpstreamClient],
        *,
        clock: Callable[[], float] = time.time,
        filler: BlobFiller | None = None,
        metrics: Metrics | None = None,
        tier: LocalTier | None = None,
    ) -> None:
        self.settings = settings
        self.redirect_ttl = settings.s3.redirect_ttl if settings.s3 else 0
        self.store = store
        self.tier = tier
        self.tiering = (
            TierServing(
                store,
                tier,
                stall_timeout=settings.upstream.read_timeout + 3 * settings.upstream.lease_ttl,
                metrics=metrics,
            )
            if tier is not None
            else None
        )
        self.coord = coordination
        # On S3 a lookup is a bucket request: its answers are reused (presence.py). A stat of
        # the disk costs less than the Redis read that would decide whether to reuse one.
        self.presence = Presence(
            store,
            coordination.deletions,
            settings.s3.lookup_ttl if settings.s3 and store.driver.lookups_are_requests else 0,
        )
        self.upstreams = upstreams
        self.clock = clock
        self.filler = filler or BlobFiller(
            store,
            coordination,
            start_timeout=settings.upstream.connect_timeout
            + settings.upstream.read_timeout
            + settings.upstream.lease_ttl,
            stall_timeout=settings.upstream.read_timeout + 3 * settings.upstream.lease_ttl,
            metrics=metrics,
            max_fills=settings.limits.max_fills,
            max_fills_per_client=settings.limits.max_fills_per_client,
            parallel_ranges=settings.upstream.parallel_ranges,
            range_min_size=settings.upstream.range_min_size,
            node_copy=self.tiering.tap if self.tiering is not None else None,
        )
        self.metrics = metrics
        # How long a request waits for another's upstream ask of the same tag or list.
        self.upstream_wait = (
            settings.upstream.connect_timeout + 2 * settings.upstream.small_answer_timeout
        )
        self.referrers_cache = ReferrersCache(
            store,
            self.upstream,
            self._spend,
            coordination.store.count,
            clock,
            settings.upstream.max_stale,
            lease=lambda target, subject: coordination.leases.tag(
                str(target), f"referrers@{subject}"
            ),
            wait=self.upstream_wait,
            max_bytes=settings.limits.referrers_max_bytes,
            max_descriptors=settings.limits.referrers_max_descriptors,
            fetches=settings.limits.referrers_fetches,
        )
        self.policy: SignaturePolicy | None = None
        if any(registry.verify for registry in settings.registries):
            self.policy = SignaturePolicy(
                self,
                coordination.verdicts,
                metrics=metrics,
                failed_ttl=lambda target: target.registry.referrers_ttl,
            )

    def upstream(self, target: Target) -> UpstreamClient:
        return self.upstreams[target.registry.name]

    def _ask(
        self,
        target: Target,
        reference: str,
        call: Callable[[], T],
        client: str | None,
        missing: type[RegistryError] = ManifestUnknown,
    ) -> T:
        """Call upstream about `reference` for `client` (within its budget), unless upstream
        recently said the repository or the reference does not exist; remember such answers
        (`missing`: ManifestUnknown or BlobUnknown) for `negative_ttl`."""
        # Per credential: what anonymous may not see, the configured account may.
        who = self.upstream(target).identity
        repo_key, ref_key = missing_key(who, str(target)), missing_key(who, str(target), reference)
        remembered = self.coord.missing.lookup(repo_key, ref_key)
        if remembered is not None:
            kind, _, rest = remembered.partition(":")
            when, _, message = rest.partition(":")
            if not when.isdigit():  # written before the time was kept
                when, message = "", rest
            error = UpstreamDenied if kind == "denied" else missing
            ago = f" {max(0, round(self.clock() - int(when)))} s ago" if when else ""
            message = f"{message} (upstream said so{ago})"
            raise error(message, reason=message)
        self._spend(client)
        try:
            return call()
        except UpstreamDenied as exc:
            self.coord.missing.remember(
                repo_key,
                f"denied:{self.clock():.0f}:{exc.message}",
                self.settings.upstream.negative_ttl,
            )
            raise
        except (ManifestUnknown, BlobUnknown) as exc:
            self.coord.missing.remember(
                ref_key,
                f"unknown:{self.clock():.0f}:{exc.message}",
                self.settings.upstream.negative_ttl,
            )
            raise

    def _spend(self, client: str | None) -> None:
        """One upstream-reaching request of `client`, within limits.client_upstream_per_minute
        (so that one client cannot spend the whole upstream quota)."""
        per_minute = self.settings.limits.client_upstream_per_minute
        if not client or not per_minute:
            return
        wait = self.coord.limits.spend_upstream(client, per_minute)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            message = (
                f"client {client} has made {per_minute} requests that reach upstream this "
                f"minute; retry in {seconds} s"
            )
            raise TooManyRequests(message, headers={"Retry-After": str(seconds)}, reason=message)

    # -- manifests ----------------------------------------------------------------------------
    def manifest(
        self, target: Target, reference: str, accept: list[str], client: str | None = None
    ) -> Manifest:
        if looks_like_digest(reference):
            try:
                digest = Digest.parse(reference)
            except DigestInvalid:
                raise ManifestUnknown(
                    "the reference is neither a valid tag nor a digest",
                    detail={"reference": reference[:300]},
                ) from None
            found = self._manifest_by_digest(target, digest, client)
            pulled = f"{target}@{found.digest}"
        else:
            found = self._manifest_by_tag(target, validate_tag(reference), client)
            pulled = f"{target}:{reference}"
        # What is stored and remembered is the same for every client: upstream is always asked
        # with every manifest type, so an old client's narrow Accept can neither replace an
        # index with one platform's manifest (distribution rewrites lists for such clients)
        # nor make a tag look missing to everyone. The client's Accept decides only this answer.
        if not accepts(accept, found.media_type):
            message = f"{reference} is a {found.media_type}, which the client does not accept"
            raise ManifestUnknown(message, reason=message)
        if self.policy is not None:
            self.policy.enforce(target, reference, found.digest, found.body)
        self.coord.pulls.touch(pulled)
        return found

    def fetch_tag(self, target: Target, tag: str) -> Manifest:
        """The tag as upstream has it now, fetched and stored whatever its TTL says (the
        follower: a HEAD said it moved). Under the tag's lease, as a client's fetch."""
        lease = self.coord.leases.tag(str(target), tag)
        acquired = lease.acquire()
        try:
            found = self._refresh_tag(target, tag, None, None)
        finally:
            if acquired:
                lease.release()
        if self.policy is not None:
            self.policy.enforce(target, tag, found.digest, found.body)
        return found

    def child_manifest(self, target: Target, digest: Digest) -> Manifest:
        """A manifest by digest, through the cache (an index's child the follower wants)."""
        return self._manifest_by_digest(target, digest, None)

    # -- referrers and signatures -------------------------------------------------------------
    def referrers(self, target: Target, digest: Digest, client: str | None = None) -> Referrers:
        return self.referrers_cache.get(target, digest, client)

    def signature_manifest(self, target: Target, reference: str) -> tuple[Digest, bytes] | None:
        """A signature manifest's digest and bytes, through the cache (None: upstream has
        none)."""
        try:
            if looks_like_digest(reference):
                found = self._manifest_by_digest(target, Digest.parse(reference), None)
            else:
                found = self._manifest_by_tag(target, validate_tag(reference), None)
        except (ManifestUnknown, DigestInvalid):
            return None
        return found.digest, found.body

    def referrer_descriptors(self, target: Target, digest: Digest) -> list[dict]:
        return self.referrers(target, digest).descriptors

    def small_blob(self, target: Target, digest: Digest, limit: int) -> bytes:
        """A small blob's bytes (a signature payload), through the cache like any pull."""
        found = self.blob(target, digest)
        if found.size > limit:
            raise UpstreamError(
                f"blob {digest} of {target} is {found.size} bytes, more than {limit}",
                reason=f"{target.registry.name} sent an oversized signature payload",
            )
        if found.stream is not None:
            return b"".join(found.stream(0, found.size - 1))
        if found.open_file is not None:
            with found.open_file() as handle:
                return handle.read(limit + 1)
        body = self.store.read_blob(digest)
        if body is None:
            raise BlobUnknown(
                f"blob {digest} vanished from the store", detail={"digest": str(digest)}
            )
        return body

    def _manifest_by_digest(self, target: Target, digest: Digest, client: str | None) -> Manifest:
        body = self.store.read_manifest(digest)
        if body is not None:
            media_type = self.store.manifest_media_type(target, digest)
            if media_type is None and self.store.is_linked(target, digest):
                # A child of a cached index: entitled, but not recorded as a revision yet.
                media_type = self._media_type_of(body)
            if media_type is not None:
                return Manifest(body, digest, media_type, "hit")
        upstream = self.upstream(target)
        fetched = self._ask(
            target,
            str(digest),
            lambda: upstream.get_manifest(target.repository, str(digest)),
            client,
        )
        if not digest.matches(fetched.body):
            raise UpstreamError(
                f"upstream {target.registry.name} served a manifest that does not match {digest}",
                reason=f"{target.registry.name} sent a manifest that does not match its digest",
            )
        media_type = self._store_manifest(target, digest, fetched.body, fetched.media_type)
        return Manifest(fetched.body, digest, media_type, "miss")

    def _manifest_by_tag(self, target: Target, tag: str, client: str | None) -> Manifest:
        cached = self._cached_tag(target, tag)
        ttl = target.registry.ttl_of(target.repository, tag)
        if cached is not None and self.clock() - cached[1].validated < ttl:
            return cached[0]
        try:
            lease = self.coord.leases.tag(str(target), tag)
            acquired = lease.acquire()
        except (CacheUnavailable, RedisError):
            lease, acquired = None, False  # no coordination: serve anyway, maybe ask twice
        if lease is not None and not acquired:
            # Another process is fetching this tag: wait for it rather than ask upstream twice.
            lease.wait_released(self.upstream_wait, TAG_WAIT)
            again = self._cached_tag(target, tag)
            if again is not None and (cached is None or again[1] != cached[1]):
                return again[0]
        elif acquired:
            assert lease is not None
            # The previous holder may have refreshed the tag between our read and our lease.
            again = self._cached_tag(target, tag)
            if again is not None and self.clock() - again[1].validated < ttl:
                lease.release()
                return again[0]
            cached = again if again is not None else cached
        try:
            return self._refresh_tag(target, tag, cached, client)
        finally:
            if lease is not None and acquired:
                lease.release()

    def _cached_tag(self, target: Target, tag: str) -> tuple[Manifest, TagRecord] | None:
        record = self.store.read_tag(target, tag)
        if record is None:
            return None
        body = self.store.read_manifest(record.digest)
        if body is None:
            return None
        return Manifest(body, record.digest, record.media_type, "hit"), record

    def _refresh_tag(
        self,
        target: Target,
        tag: str,
        cached: tuple[Manifest, TagRecord] | None,
        client: str | None,
    ) -> Manifest:
        upstream = self.upstream(target)
        try:
            if cached is not None:
                head = self._ask(
                    target,
                    tag,
                    lambda: upstream.head_manifest(target.repository, tag),
                    client,
                )
                if head.digest == cached[0].digest:
                    record = TagRecord(cached[0].digest, cached[0].media_type, self.clock())
                    self.store.write_tag(target, tag, record)
                    return _replace_cache(cached[0], "revalidated")
            fetched = self._ask(
                target,
                tag,
                lambda: upstream.get_manifest(target.repository, tag),
                client,
            )
        except RegistryError as exc:  # unreachable, 5xx, 429, denied: serve what we have
            if cached is not None and not isinstance(exc, ManifestUnknown):
                age = self.clock() - cached[1].validated
                max_stale = self.settings.upstream.max_stale
                if max_stale is None or age <= max_stale:
                    log.warning("serving stale %s:%s: %s", target, tag, exc.message)
                    return _replace_cache(cached[0], "stale")
                # Upstream has not confirmed it for longer than max_stale: it may have been
                # withdrawn (a 401/403 on revalidation), so stop serving it.
                log.warning("not serving %s:%s, unconfirmed for %.0f s", target, tag, age)
            raise
        digest = sha256_of(fetched.body)
        claimed = fetched.digest
        if claimed is not None and claimed != digest:
            if not claimed.matches(fetched.body):
                raise UpstreamError(
                    f"upstream {target.registry.name} served a manifest for {tag} whose bytes "
                    f"do not match its Docker-Content-Digest",
                    reason=f"{target.registry.name} sent a manifest that does not match its digest",
                )
            digest = claimed
        media_type = self._store_manifest(target, digest, fetched.body, fetched.media_type)
        self.store.write_tag(target, tag, TagRecord(digest, media_type, self.clock()))
        return Manifest(fetched.body, digest, media_type, "miss")

    def _store_manifest(
        self, target: Target, digest: Digest, body: bytes, content_type: str
    ) -> str:
        try:
            media_type, references = parse_manifest(body, content_type)
            if media_type not in KNOWN_MANIFEST_TYPES:
                # We send a stored type back as Content-Type: never text/html or the like.
                raise InvalidManifest(f"unknown manifest media type {media_type[:100]!r}")
        except InvalidManifest as exc:
            raise UpstreamError(
                f"upstream {target.registry.name} served an invalid manifest for "
                f"{target.repository}: {exc}",
                reason=f"{target.registry.name} sent an invalid manifest, not cached",
            ) from None
        if self.store.put_verified_bytes(digest, body):
            self.coord.store.count(len(body))
        # Its references are not linked to the repository: a manifest (anyone's, in a public
        # repository) naming a digest proves nothing about who may read that blob. Blobs are
        # linked when upstream serves or confirms them for this repository (blob()).
        self.store.put_manifest_revision(target, digest, media_type)
        # After the disk writes: a sweep running now must spare what this manifest needs.
        self.coord.gc.note_live([digest, *references])
        self.coord.catalog.add(self.catalog_name(str(target)))
        return media_type

    @staticmethod
    def _media_type_of(body: bytes) -> str | None:
        try:
            return parse_manifest(body, "")[0]
        except InvalidManifest:
            return None

    # -- blobs -----------------------------------------------------------------------------
    def blob(
        self, target: Target, digest: Digest, *, head: bool = False, client: str | None = None
    ) -> Blob:
        asking = self.presence.asking()
        size = asking.remembered_size(digest)
        # A GET of a blob being fetched joins its fill without asking the bucket (where that
        # is a request), whose answer could only be "not yet".
        asked = size is None and (head or not self.filler.in_flight(digest))
        if asked:
            size = asking.blob_size(digest)
            if size is None and self.tiering is not None:
                # The bucket lost it (a sweep whose message this node missed): so has the tier.
                self.tiering.forget(digest)
        if size is not None:
            if not asking.is_linked(target, digest):
                self._entitle(target, digest, client)
            if head:
                return Blob(digest, size, "hit")
            if self.redirect_ttl:
                url = self.store.presign_blob(digest, self.redirect_ttl)
                if url is not None:
                    return Blob(digest, size, "hit", redirect=url)
            if self.tiering is not None:
                return self._from_tier(digest, size)
            # Open now: once open, the bytes stay readable even if a GC sweep unlinks the file.
            try:
                handle = self.store.open_blob(digest)
            except FileNotFoundError:
                handle = None  # swept between the stat and the open: a miss after all
            if handle is not None:
                if self.metrics is not None and self.store.driver.lookups_are_requests:
                    self.metrics.s3_blob_reads.labels("client").inc()  # S3, one per client
                return Blob(digest, size, "hit", open_file=lambda: handle)
        upstream = self.upstream(target)
        if head:
            remote = self._ask(
                target, str(digest), lambda: self._remote_size(target, digest), client, BlobUnknown
            )
            return Blob(digest, remote, "miss")
        try:
            started = self._ask(
                target,
                str(digest),
                lambda: self.filler.start(target, upstream, digest, client, asked=asked),
                client,
                BlobUnknown,
            )
        except RedisError as exc:
            raise redis_unavailable(exc) from None
        if self.metrics is not None:
            role = "fetcher" if started.fetcher else "follower"
            self.metrics.fills.labels(target.registry.name, role).inc()
        if started.committed:  # a fill (maybe ours, and fast) finished while we looked
            found = self.blob(target, digest, client=client)
            return replace(found, cache="miss") if started.fetcher else found
        if not started.fetcher and self.coord.fills.read(digest).repository != str(target):
            # Joining a fill another repository's request started: only what upstream
            # confirms this repository has (checked before a single byte is streamed).
            self._entitle(target, digest, client)
        size = started.size
        if self.tiering is not None:
            # One follower of the fill per node (a copy into the node's tier), which every
            # client of the node streams, rather than one read of the pieces per client.
            tiering = self.tiering

            def source(offset: int) -> Iterator[bytes]:
                # The node's copy verifies the digest before its clients' last byte: it need
                # not wait for the bucket's copy of the blob too.
                return self.filler.stream(
                    target, upstream, digest, size, offset, size - 1, until_verified=True
                )

            return Blob(
                digest,
                size,
                "miss",
                stream=lambda start, end: tiering.stream(digest, size, start, end, source),
                spans=lambda start, end: tiering.stream(
                    digest, size, start, end, source, spans=True
                ),
                joined=not started.fetcher,
            )
        return Blob(
            digest,
            size,
            "miss",
            stream=lambda start, end: self.filler.stream(
                target, upstream, digest, size, start, end
            ),
            spans=lambda start, end: self.filler.stream(
                target, upstream, digest, size, start, end, spans=True
            ),
            joined=not started.fetcher,
        )

    def _from_tier(self, digest: Digest, size: int) -> Blob:
        """A committed blob of an S3 store, through the node's local tier (tiering.py)."""
        assert self.tiering is not None
        local = self.tiering.open(digest, size)
        if local is not None:
            return Blob(digest, size, "hit", open_file=lambda: local)
        tiering = self.tiering
        return Blob(
            digest,
            size,
            "hit",
            stream=lambda start, end: tiering.stream(digest, size, start, end),
            spans=lambda start, end: tiering.stream(digest, size, start, end, spans=True),
        )

    def prefetch_blob(
        self,
        target: Target,
        digest: Digest,
        progress: Callable[[int, int], None] | None = None,
    ) -> Prefetched:
        """Bring a blob into the cache as a client's pull would (the same fills, joined by
        any client meanwhile), reading it to its verified end; progress(done, size)."""
        found = self.blob(target, digest)
        if found.stream is None:  # on disk: cached before, or a fill that finished at once
            if found.open_file is not None:
                found.open_file().close()
            miss = found.cache == "miss"
            if miss and progress is not None:
                progress(found.size, found.size)
            return Prefetched(found.size, miss, joined=False)
        done = 0
        for chunk in found.stream(0, found.size - 1):
            done += len(chunk)
            if progress is not None:
                progress(done, found.size)
        # A committed blob streamed through an S3 node's local tier is no miss.
        return Prefetched(found.size, miss=found.cache == "miss", joined=found.joined)

    def _entitle(self, target: Target, digest: Digest, client: str | None) -> None:
        """Same bytes cached or being fetched for another repository: this one may have them
        only if upstream confirms it has them too, so private content cannot leak across
        names. Remembered as a link."""
        self._ask(
            target, str(digest), lambda: self._remote_size(target, digest), client, BlobUnknown
        )
        self.store.link_blob(target, digest)
        self.coord.gc.note_live([digest])

    def _remote_size(self, target: Target, digest: Digest) -> int:
        size = self.upstream(target).blob_size(target.repository, str(digest))
        if size is None:
            message = f"upstream {target.registry.name} has no blob {digest} in {target.repository}"
            raise BlobUnknown(message, detail={"digest": str(digest)}, reason=message)
        return size

    # -- listings --------------------------------------------------------------------------------
    def tags(
        self, target: Target, n: int | None, last: str | None, client: str | None = None
    ) -> tuple[list[str], bool]:
        """Tags of a repository and whether more follow; upstream first, the cache when it fails."""
        try:
            self._spend(client)
            data = self.upstream(target).list_tags(target.repository, n, last)
            tags = [t for t in data.get("tags") or [] if is_tag(t)]  # upstream's: input
            return tags, n is not None and len(tags) >= n
        except NameUnknown:
            raise
        except RegistryError as exc:
            cached = self.store.list_tags(target)
            if not cached:
                raise NameUnknown(
                    f"{target} is not cached and its upstream failed: {exc.message}"
                ) from None
            return _page(cached, n, last)

    def catalog_name(self, stored: str) -> str:
        return catalog_name(self.settings.default_registry, stored)

    def _catalog_names(self) -> list[str]:
        return sorted({self.catalog_name(name) for name in self.store.iter_repositories()})

    def catalog(self, n: int | None, last: str | None) -> tuple[list[str], bool]:
        try:
            names = self.coord.catalog.page(None if n is None else n + 1, last, self._catalog_names)
        except RedisError:
            return _page(self._catalog_names(), n, last)
        if n is not None and len(names) > n:
            return names[:n], True
        return names, False


def _page(items: Sequence[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    chosen = [i for i in items if i > last] if last else list(items)
    if n is None:
        return chosen, False
    return chosen[:n], len(chosen) > n


def _replace_cache(manifest: Manifest, cache: str) -> Manifest:
    return Manifest(manifest.body, manifest.digest, manifest.media_type, cache)
