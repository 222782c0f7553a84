"""The fetcher side of a fill: the one process that holds a digest's lease opens (or
resumes) the upstream read, copies it into the store's partial content in order (or as
parallel ranges, ranges.py), hashes it as it goes, and commits only what matched; a failure
is classified and recorded in the fill record before the lease goes. The reading side (who
fetches, and every client streaming the fill) is fill.py."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from registry.coordination import Coordination, Lease
from registry.coordination.fill_records import (
    FailReason,
    FillPhase,
    FillWriter,
)
from registry.digests import Digest
from registry.errors import (
    RECORDED_ERRORS,
    CacheUnavailable,
    RegistryError,
    UpstreamError,
    UpstreamUnavailable,
    redis_unavailable,
    storage_failure,
)
from registry.metrics import Metrics
from registry.names import Target
from registry.offload import hash_update
from registry.offload import spawn as spawn_thread
from registry.pullthrough.range_workers import RangedCopy
from registry.pullthrough.ranges import (
    MIN_SEGMENT,
    LeaseLost,
    RangedUpload,
    Segment,
)
from registry.store import ContentStore
from registry.store.driver import PartialWriter
from registry.upstream.client import BlobStream, UpstreamClient

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
PROGRESS_INTERVAL = 0.2


class _DigestMismatch(UpstreamError):
    """The bytes upstream sent do not hash to the digest (FailReason.DIGEST_MISMATCH)."""


class NodeCopy(Protocol):
    """A copy of the blob the node keeps for itself (an S3 node's local tier,
    pullthrough/tiering.py), written by the fill from the bytes it hashes."""

    def write(self, pos: int, data: bytes) -> None: ...

    def verified(self) -> None:
        """The fill's bytes hash to the digest (before the store's commit)."""

    def failed(self, error: RegistryError) -> None: ...

    def close(self) -> None: ...


class _CopyingHasher:
    """A fill's hasher that also hands what it hashes (in order, from the blob's first
    byte) to the node's own copy, once one is attached."""

    __slots__ = ("copy", "hasher", "pos")

    def __init__(self, hasher: Any) -> None:
        self.hasher = hasher
        self.pos = 0
        self.copy: NodeCopy | None = None

    def update(self, data: bytes) -> None:
        self.hasher.update(data)
        if self.copy is not None:
            self.copy.write(self.pos, data)
        self.pos += len(data)

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()


@dataclass
class _Fill:
    """One fill's moving parts, as its steps leave them."""

    target: Target
    upstream: UpstreamClient
    digest: Digest
    lease: Lease
    writer: FillWriter
    upload: PartialWriter | None = None
    stream: BlobStream | None = None
    hasher: Any = None
    offset: int = 0  # bytes in the upload, in order from the blob's start
    fetched_from: int = 0  # where this fill's own upstream bytes began
    total: int = 0
    streaming: bool = False  # upstream answered with the blob's size
    # A parallel fill (ranges.py): its upload and segments, and its first range's stream.
    ranged: RangedUpload | None = None
    first: Segment | None = None
    workers: int = 1  # how many ranges a parallel fill fetches at once
    copy: NodeCopy | None = None  # the node's own copy, written as the fill hashes

    @property
    def registry(self) -> str:
        return self.upstream.registry.name

    @property
    def fetched(self) -> int:
        """Bytes this fill got from upstream."""
        if self.ranged is not None:
            return self.ranged.fetched
        return max(0, self.offset - self.fetched_from)


class Fetcher:
    def __init__(
        self,
        store: ContentStore,
        coordination: Coordination,
        *,
        metrics: Metrics | None,
        parallel_ranges: int,
        range_min_size: int,
        node_copy: Callable[[Digest, int, int], NodeCopy | None] | None,
    ) -> None:
        self.store = store
        self.coord = coordination
        self.metrics = metrics
        self.parallel_ranges = parallel_ranges
        self.range_min_size = range_min_size
        # A copy of each blob this process fetches for the node itself (S3's local tier):
        # node_copy(digest, size, at) with `at` bytes already hashed; None: none.
        self.node_copy = node_copy

    def run(
        self,
        target: Target,
        upstream: UpstreamClient,
        digest: Digest,
        lease: Lease,
        writer: FillWriter,
        client: str | None = None,
    ) -> None:
        """The fill itself, in the background: open (or resume), copy, verify and commit;
        a failure is classified and recorded before the lease goes."""
        done = threading.Event()
        lease.keep_alive(lambda: not done.is_set(), writer.touch)
        fill = _Fill(target, upstream, digest, lease, writer)
        started = time.monotonic()
        try:
            self._open_or_resume(fill)
            self._copy(fill)
            self._verify_and_commit(fill)
            log.info(
                "fill committed digest=%s upstream=%s repository=%s bytes=%d seconds=%.3f",
                digest,
                fill.registry,
                target.repository,
                fill.offset,
                time.monotonic() - started,
            )
        except LeaseLost:
            log.warning("fill of %s lost its lease; another process continues it", digest)
        except Exception as exc:  # upstream's answers, mid-stream resets, timeouts, disk full
            reason, error = self._classify(fill, exc)
            if fill.copy is not None:
                fill.copy.failed(error)
            self._fail(writer, reason, error, fill.streaming, fill.registry)
        finally:
            done.set()
            self._close(fill, client)

    def _open_or_resume(self, fill: _Fill) -> None:
        """Open the upstream stream and the upload: from the bytes an earlier fill left when
        upstream honours Range (their hash recomputed), else from the start."""
        if self.parallel_ranges > 1 and self.store.supports_extents:
            self._open_ranges(fill)
            return
        digest, upstream = fill.digest, fill.upstream
        # The file is only created once upstream has answered, so refused fetches leave
        # nothing behind.
        held = self.store.upload_size(digest) or 0
        fill.stream = upstream.open_blob(fill.target.repository, str(digest), held)
        fill.upload = self.store.open_upload(digest, fill.stream.total)
        fill.hasher = self._hasher(digest)
        if fill.stream.offset == held and held:
            held = _hash_prefix(fill.upload, fill.hasher, held)
        if fill.stream.offset != held:  # upstream ignored Range (or the prefix shrank)
            if fill.stream.offset:
                fill.stream.close()
                fill.stream = upstream.open_blob(fill.target.repository, str(digest), 0)
            fill.upload.truncate(0)
            fill.hasher = self._hasher(digest)
            held = 0
        self._announce(fill, fill.stream.total, held)

    def _open_ranges(self, fill: _Fill) -> None:
        """Open a parallel fill (ranges.py): the first range asked for is at most
        `range_min_size` from the first byte not held, so a smaller blob is one request as
        before and a 206 shows that upstream honours Range. A 200 is the whole blob in one
        stream (nothing fetched twice); held bytes and extents are resumed from."""
        digest, upstream, repository = fill.digest, fill.upstream, fill.target.repository
        held = self.store.upload_size(digest) or 0
        ranged = None
        start, ahead = 0, None
        if held or self.store.upload_extents(digest):
            # The file exists already: open it now, rehash what it holds, take in extents.
            fill.upload = self.store.open_upload(digest, None)
            fill.hasher = self._hasher(digest)
            held = _hash_prefix(fill.upload, fill.hasher, held)
            fill.upload.settle(held)  # on S3: the pieces up to `held` are stored
            ranged = RangedUpload(self.store, digest, fill.upload, fill.hasher, held, 0)
            fill.ranged = ranged
            ranged.adopt_extents()
            start, ahead = ranged.prefix, ranged.next_extent(ranged.prefix)
        # The first range ends on the store's grid (S3: a multiple of part_size, the pieces of
        # all but huge blobs), so that the ranges after it can start on it too.
        grid = self.store.extent_alignment(0)
        first = max(grid, self.range_min_size - self.range_min_size % grid)
        end = (ahead if ahead is not None else start + first) - 1
        fill.stream = stream = upstream.open_range(repository, str(digest), start, end)
        if not stream.ranged:
            # Upstream ignores Range: this one stream is the whole blob, from its first byte.
            if ranged is not None:
                ranged.discard_extents()
                ranged.close()
                fill.ranged = None
            if fill.upload is None:
                fill.upload = self.store.open_upload(digest, stream.total)
            fill.upload.truncate(0)
            fill.hasher = self._hasher(digest)
            self._announce(fill, stream.total, 0)
            return
        total = stream.total or 0
        if ranged is None:
            fill.upload = self.store.open_upload(digest, total)
            fill.hasher = self._hasher(digest)
            ranged = fill.ranged = RangedUpload(self.store, digest, fill.upload, fill.hasher, 0, 0)
        ranged.total = total
        if stream.response is not None:
            fill.first = Segment(start, min(end + 1, total), start, taken=True)
            ranged.add(fill.first)
        align = self.store.extent_alignment(total)
        if fill.first is not None and fill.first.end < total and fill.first.end % align:
            # Ranges past the first would not start on the store's grid (S3's pieces of a
            # huge blob): the first range's stream goes on alone, in one more request.
            ranged.plan(start, 1, total, align)
            fill.workers = 1
        else:
            # Segments of at least 8 MiB (each is a request), less where range_min_size is
            # set lower than that.
            smallest = min(MIN_SEGMENT, self.range_min_size // 4)
            ranged.plan(start, self.parallel_ranges, smallest, align)
            fill.workers = self.parallel_ranges
        fill.offset = ranged.prefix
        self._announce(fill, total, total - ranged.remaining())

    def _announce(self, fill: _Fill, total: int | None, held: int) -> None:
        """Upstream answered: the blob's size goes to the fill record (clients wait for it)."""
        if fill.ranged is None:
            fill.fetched_from = fill.offset = held
        if total is None:
            raise UpstreamError(
                f"upstream {fill.registry} did not announce the size of {fill.digest}",
                reason=f"{fill.registry} sent a blob without its size, not cached",
            )
        fill.total = total
        if self.node_copy is not None and isinstance(fill.hasher, _CopyingHasher):
            copy = self.node_copy(fill.digest, total, fill.hasher.pos)
            if copy is not None:
                fill.copy = fill.hasher.copy = copy
        fill.writer.streaming(fill.total, held, fill.registry)
        fill.streaming = True

    def _hasher(self, digest: Digest) -> Any:
        hasher = digest.hasher()
        return _CopyingHasher(hasher) if self.node_copy is not None else hasher

    def _copy_ranges(self, fill: _Fill) -> None:
        """A parallel fill's workers, until every segment is in (range_workers.RangedCopy)."""
        ranged = fill.ranged
        assert ranged is not None and fill.stream is not None
        untaken = sum(1 for s in ranged.segments if not s.taken and not s.done)
        copy = RangedCopy(
            ranged,
            fill.upstream,
            fill.target.repository,
            workers=max(1, min(fill.workers, untaken + 1)),
            lease_lost=lambda: fill.lease.lost,
            report=lambda: fill.writer.progress(
                ranged.total - ranged.remaining(), ranged.stored(), ranged.ranges()
            ),
            spawn=functools.partial(spawn_thread, name="blob-range"),
        )
        first, fill.stream = fill.stream, None
        try:
            if fill.first is not None:
                copy.run(first, fill.first)
            else:
                first.close()  # nothing past the bytes held (a 416): only extents to take in
                copy.run(None, None)
        finally:
            fill.offset = ranged.prefix
        if ranged.prefix != ranged.total:
            raise UpstreamError(
                f"the ranges of {fill.digest} from {fill.registry} left a gap at "
                f"{ranged.prefix} of {ranged.total} bytes",
                reason=f"{fill.registry} ranges left a gap, not cached",
            )
        ranged.settle()

    def _copy(self, fill: _Fill) -> None:
        """Upstream's bytes into the upload, in order, hashed as they pass; progress goes to
        the fill record for followers in other processes."""
        if fill.ranged is not None:
            self._copy_ranges(fill)
            return
        assert fill.stream is not None and fill.upload is not None
        last_report = time.monotonic()
        remote = self.store.lookups_are_requests
        reported = -1
        for chunk in fill.stream.chunks():
            if fill.lease.lost:
                raise LeaseLost()
            fill.upload.pwrite(chunk, fill.offset)
            hash_update(fill.hasher, chunk)
            fill.offset += len(chunk)
            # A fast upstream never blocks the socket read: yield so that the clients
            # streaming this fill from the same gevent worker get their turn.
            time.sleep(0)
            if fill.offset > fill.total:
                raise UpstreamError(
                    f"upstream {fill.registry} sent more bytes than announced for {fill.digest}",
                    reason=f"{fill.registry} sent a blob longer than announced",
                )
            now = time.monotonic()
            stored = fill.upload.stored()
            # Followers elsewhere learn of a new piece (S3) from here at once, rather than
            # by asking the store.
            if now - last_report >= PROGRESS_INTERVAL or (remote and stored != reported):
                fill.writer.progress(fill.offset, stored)
                last_report, reported = now, stored
        if fill.offset != fill.total:
            raise UpstreamError(
                f"upstream {fill.registry} ended {fill.digest} after {fill.offset} of "
                f"{fill.total} bytes",
                reason=f"{fill.registry} cut the blob short, not cached",
            )

    def _verify_and_commit(self, fill: _Fill) -> None:
        """Commit the upload only when its bytes hash to the digest (and the lease is ours)."""
        assert fill.upload is not None
        if fill.hasher.hexdigest() != fill.digest.hex:
            fill.upload.discard()
            if fill.ranged is not None:
                fill.ranged.discard_extents()
            raise _DigestMismatch(
                f"upstream {fill.registry} served bytes that do not match {fill.digest}",
                reason=f"{fill.registry} sent a blob that does not match its digest",
            )
        if fill.lease.lost:
            raise LeaseLost()
        if fill.copy is not None:
            fill.copy.verified()  # the node's clients have their last byte
        if fill.upload.stored():
            # The last, short piece (S3) is stored before the record says every byte is: a
            # follower that only waits for the bytes to be verified (a node's tier) reads
            # it. A blob smaller than a piece stays one PUT at the commit.
            fill.upload.flush()
        # A rename on disk, but on S3 a multipart copy that takes seconds: followers
        # waiting for the last byte must not take that for a stall.
        fill.writer.committing(fill.offset)
        # Linked first: the request that started this fill may see the committed blob the
        # moment it lands, and must find it already entitled for its repository (else it
        # would ask upstream to confirm what upstream just served it).
        self.store.link_blob(fill.target, fill.digest)
        self.store.commit_upload(fill.upload, fill.digest)
        self.coord.store.count(fill.offset)
        fill.writer.committed(fill.offset)

    @staticmethod
    def _classify(fill: _Fill, exc: Exception) -> tuple[FailReason, RegistryError]:
        """Why a fill failed, and the error its waiting clients get."""
        if isinstance(exc, _DigestMismatch):
            return FailReason.DIGEST_MISMATCH, exc
        if isinstance(exc, RegistryError):
            return FailReason.UPSTREAM_ERROR, exc
        if isinstance(exc, RedisError):  # ours (a failover, say), not the upstream's
            return FailReason.COORDINATION_ERROR, redis_unavailable(exc)
        error: RegistryError | None = storage_failure(exc)
        if error is None and isinstance(exc, OSError) and not fill.streaming:
            # Upstream's failures arrive as RegistryErrors until it has answered with the
            # blob's size: this is our own file (permissions, a vanished directory).
            log.error("fill of %s failed on the storage: %s", fill.digest, exc)
            error = CacheUnavailable("the cache's storage failed", reason="cache storage failed")
        if error is not None:
            # Our disk, not the upstream: drop the partial so that it does not go on holding
            # the space (unless the lease, and so the file, is someone else's).
            if fill.upload is not None and not fill.lease.lost:
                try:
                    fill.upload.discard()
                    if fill.ranged is not None:
                        fill.ranged.discard_extents()
                except OSError as gone:  # the store is down: the GC drops stale pieces
                    log.warning("could not drop the pieces of %s: %s", fill.digest, gone)
            return FailReason.STORAGE_ERROR, error
        timed_out = "timeout" in type(exc).__name__.lower()
        return (
            FailReason.TIMEOUT if timed_out else FailReason.UPSTREAM_ERROR,
            UpstreamUnavailable(
                f"fill of {fill.digest} from upstream {fill.registry} failed: {type(exc).__name__}",
                reason=f"{fill.registry} broke off the blob, not cached",
            ),
        )

    def _close(self, fill: _Fill, client: str | None) -> None:
        """Every fill's end, whatever happened: the limits, the metric, the stream, the
        upload (dropped if it holds nothing to resume from) and, last, the lease."""
        try:
            if self.metrics is not None and fill.streaming:
                self.metrics.upstream_bytes.labels(fill.registry).inc(fill.fetched)
            if fill.stream is not None:
                fill.stream.close()
            if fill.copy is not None:
                fill.copy.close()
            extents = fill.ranged is not None and fill.ranged.has_extents()
            if fill.ranged is not None:
                fill.ranged.close()
            if fill.upload is not None:
                if fill.offset == 0 and not extents and not fill.lease.lost:
                    # Nothing to resume from (a no-op after a commit). Not once the lease is
                    # lost: the file may be another fetcher's by now.
                    fill.upload.discard()
                fill.upload.close()
        except OSError as exc:  # the store is down: what is left is resumed or swept
            log.warning("fill of %s: could not tidy its upload: %s", fill.digest, exc)
        finally:
            # Redis may be down too (these then wait for their TTLs).
            with contextlib.suppress(RedisError):
                self.coord.limits.end_fill(fill.digest, client)
            with contextlib.suppress(RedisError):
                fill.lease.release()

    def _fail(
        self,
        writer: FillWriter,
        reason: FailReason,
        error: RegistryError,
        streaming: bool,
        registry: str,
    ) -> None:
        log.warning("fill of %s failed (%s): %s", writer.digest, reason.value, error.message)
        if self.metrics is not None:
            self.metrics.fill_failures.labels(registry, reason.value).inc()
        try:
            writer.failed(
                reason,
                FillPhase.STREAMING if streaming else FillPhase.STARTING,
                error_class=next(
                    c.__name__ for c in type(error).__mro__ if c.__name__ in RECORDED_ERRORS
                ),
                error_message=error.message,
                error_reason=error.reason or "",
                retry_after=error.headers.get("Retry-After", ""),
            )
        except Exception:
            log.warning("could not record the failure of the fill of %s", writer.digest)

    # -- every client ----------------------------------------------------------------------------


def _hash_prefix(upload: PartialWriter, hasher: Any, size: int) -> int:
    offset = 0
    while offset < size:
        data = upload.read_range(offset, min(READ_CHUNK, size - offset))
        if not data:
            break
        hasher.update(data)
        offset += len(data)
    return offset
