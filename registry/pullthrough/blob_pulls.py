"""Blobs through the cache: a hit (the store, an S3 node's tier, a presigned redirect), or
a fill joined or started (fill.py), only for a repository upstream says has the blob."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace

from redis.exceptions import RedisError

from registry.digests import Digest
from registry.errors import (
    BlobUnknown,
    UpstreamError,
    redis_unavailable,
)
from registry.names import Target
from registry.pullthrough.answers import Blob, Prefetched
from registry.pullthrough.base import PullThroughBase

log = logging.getLogger("registry.pullthrough")


class BlobPulls(PullThroughBase):
    def small_blob(self, target: Target, digest: Digest, limit: int) -> bytes:
        """A small blob's bytes (a signature payload), through the cache like any pull."""
        found = self.blob(target, digest)
        if found.size > limit:
            raise UpstreamError(
                f"blob {digest} of {target} is {found.size} bytes, more than {limit}",
                reason=f"{target.registry.name} sent an oversized signature payload",
            )
        body = found.read_all(limit)
        if body is None:
            body = self.store.read_blob(digest)
        if body is None:
            raise BlobUnknown(
                f"blob {digest} vanished from the store", detail={"digest": str(digest)}
            )
        return body

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
            if self.tiering is not None and self.tiering.keeps(size):
                return self._from_tier(digest, size)
            # Open now: once open, the bytes stay readable even if a GC sweep unlinks the file.
            try:
                handle = self.store.open_blob(digest)
            except FileNotFoundError:
                handle = None  # swept between the stat and the open: a miss after all
            if handle is not None:
                if self.metrics is not None and self.store.lookups_are_requests:
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
        if self.tiering is not None and self.tiering.keeps(size):
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
        on_disk = found.stream is None  # cached before, or a fill that finished at once
        found.drain(progress)
        if not on_disk and found.cache == "miss" and self.tiering is not None and found.size:
            # Through a node's tier the last byte comes once the fill's bytes are verified,
            # before the bucket's commit: a prefetch that returned then could end its
            # process (a worker's job, `warm`) with the fill it runs still uncommitted.
            # The fill's own last byte waits for the commit.
            tail = self.filler.stream(
                target, self.upstream(target), digest, found.size, found.size - 1, found.size - 1
            )
            for _ in tail:
                pass
        miss = found.cache == "miss"  # a committed blob through a node's tier is no miss
        if on_disk and miss and progress is not None:
            progress(found.size, found.size)
        return Prefetched(found.size, miss, joined=found.joined and not on_disk)

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
