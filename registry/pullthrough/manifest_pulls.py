"""Manifests through the cache: by digest, and by tag with its freshness (tag_ttl, one
upstream ask per tag at a time, stale while upstream fails), verified and stored."""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from registry.digests import Digest, looks_like_digest, parse_or_none, sha256_of
from registry.errors import (
    CacheUnavailable,
    DigestInvalid,
    ManifestUnknown,
    RegistryError,
    UpstreamError,
)
from registry.mediatypes import KNOWN_MANIFEST_TYPES
from registry.names import Target, is_tag, validate_tag
from registry.pullthrough.answers import Manifest, _replace_cache
from registry.pullthrough.base import PullThroughBase
from registry.pullthrough.manifests import InvalidManifest, accepts, parse_manifest
from registry.store import TagRecord

log = logging.getLogger("registry.pullthrough")

# How long a request waits for another process's fetch of the same tag before doing it itself.
TAG_WAIT = 0.05


class ManifestPulls(PullThroughBase):
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
        else:
            found = self._manifest_by_tag(target, validate_tag(reference), client)
        # What is stored and remembered is the same for every client: upstream is always asked
        # with every manifest type, so an old client's narrow Accept can neither replace an
        # index with one platform's manifest (distribution rewrites lists for such clients)
        # nor make a tag look missing to everyone. The client's Accept decides only this answer.
        if not accepts(accept, found.media_type):
            message = f"{reference} is a {found.media_type}, which the client does not accept"
            raise ManifestUnknown(message, reason=message)
        if self.policy is not None:
            self.policy.enforce(target, reference, found.digest, found.body)
        self.count_pull(target, reference, found.digest)
        return found

    def count_pull(self, target: Target, reference: str, digest: Digest) -> None:
        """A pull answered: counted under its tag, or under the digest asked for."""
        self.coord.pulls.touch(
            f"{target}:{reference}" if is_tag(reference) else f"{target}@{digest}"
        )

    def cached(self, target: Target, reference: str) -> Manifest | None:
        """What the cache answers `reference` with now, asking nobody: a tag it holds fresh
        (within its tag_ttl, the same test as manifest()'s), or a digest this repository has
        a revision of. None where only manifest() can answer: a miss, a stale tag, a child
        not recorded yet, a repository under a signature policy. The caller counts the pull
        (count_pull) as manifest() does."""
        if target.registry.verify_rule(target.repository) is not None:
            return None
        if looks_like_digest(reference):
            digest = parse_or_none(reference)
            if digest is None:
                return None
            body = self.store.read_manifest(digest)
            if body is None:
                return None
            media_type = self.presence.media_type(target, digest)
            return Manifest(body, digest, media_type, "hit") if media_type is not None else None
        if not is_tag(reference):
            return None
        found = self._cached_tag(target, reference, remembered=True)
        if found is None:
            return None
        return found[0] if self._fresh(target, reference, found[1]) else None

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

    def _manifest_by_digest(self, target: Target, digest: Digest, client: str | None) -> Manifest:
        body = self.store.read_manifest(digest)
        if body is not None:
            media_type = self.presence.media_type(target, digest)
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
        cached = self._cached_tag(target, tag, remembered=True)
        if cached is not None and self._fresh(target, tag, cached[1]):
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
            if again is not None and self._fresh(target, tag, again[1]):
                lease.release()
                return again[0]
            cached = again if again is not None else cached
        try:
            return self._refresh_tag(target, tag, cached, client)
        finally:
            if lease is not None and acquired:
                lease.release()

    def _fresh(self, target: Target, tag: str, record: TagRecord) -> bool:
        """Whether upstream was asked about the tag within its tag_ttl."""
        return self.clock() - record.validated < target.registry.ttl_of(target.repository, tag)

    def _cached_tag(
        self, target: Target, tag: str, *, remembered: bool = False
    ) -> tuple[Manifest, TagRecord] | None:
        """The tag's manifest and record; `remembered`: a record this process read may do
        (presence.py: on S3, while fresh and no tag moved), else the store is read."""
        if remembered:
            record = self.presence.tag_record(
                target, tag, lambda known: self._fresh(target, tag, known)
            )
        else:
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
                    log.warning("serving stale %s:%s: %s", target, tag, exc.cause)
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
        # What the tag named before (without a cached answer, the follower's fetch or a
        # manifest gone from under its tag: the file's): a new tag moves nothing anyone
        # remembers.
        before = cached[1] if cached is not None else self.store.read_tag(target, tag)
        self.store.write_tag(target, tag, TagRecord(digest, media_type, self.clock()))
        if before is not None and before.digest != digest:
            self._tag_moved(target, tag)
        return Manifest(fetched.body, digest, media_type, "miss")

    def _tag_moved(self, target: Target, tag: str) -> None:
        """Processes that remember the tag's record read it again (presence.py)."""
        try:
            self.coord.tag_moves.happened()
        except RedisError as exc:
            log.warning(
                "%s:%s moved; could not tell other processes (%s): they see it within its tag_ttl",
                target,
                tag,
                exc,
            )

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
