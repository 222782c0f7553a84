"""Blobs of an S3 store served through the node's local tier (`storage.s3.local_cache`,
store/tier.py): committed ones, and fills in progress.

A blob with a verified local copy is served from it (sendfile, as from the filesystem
driver). A blob larger than the tier keeps (LocalTier.keeps: its low watermark) never goes
through it: its commit would evict it under the clients waiting for its last byte, so it is
read from the bucket (or a fill's pieces) per client. Otherwise the first request of the
node copies it in from the bucket, in the background, one read of the bucket for the node
whatever the number of its clients, and every client of the node streams that copy as it
grows (FileSpans, sent with sendfile); its last byte waits for the copy's verified rename.
A fill still in progress is copied in the same way by following it (one follower of the
fill per node instead of one per client), except on the node whose process fetches it:
there the fill writes the copy itself (TierNodeCopy, from the bytes it hashes). A failure
of that fill reaches the node's clients. A copy whose process died is taken over by the
next client that finds no live writer (resuming from its bytes).

The bucket stays the truth: a blob is served from the tier only after the bucket said it has
it (the caller's stat, an answer reused while nothing was deleted: pullthrough/presence.py),
and a copy of a blob the bucket lost is forgotten then; the GC's deletions reach every node's
tier at once through coordination/tiers.py.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, Literal, overload

from registry.digests import Digest
from registry.errors import CacheUnavailable, RegistryError, storage_failure
from registry.metrics import Metrics
from registry.offload import spawn as spawn_thread
from registry.store import ContentStore
from registry.store.driver import FileSpan
from registry.store.tier import LocalTier, TierCopy

log = logging.getLogger(__name__)

# The blob's bytes from an offset: a fill's stream (BlobFiller.stream), or the bucket's object.
Source = Callable[[int], Iterator[bytes]]

COPY_CHUNK = 1024 * 1024
READ_CHUNK = 1024 * 1024
# A client following a growing copy is sent at least this much at a time (or all there is
# to send): see stream().
MIN_SEND = 1024 * 1024
# After a copy broke off (the bucket failing), the node's next attempt waits this long.
RETRY_AFTER = 1.0


class TierServing:
    def __init__(
        self,
        store: ContentStore,
        tier: LocalTier,
        *,
        stall_timeout: float,
        metrics: Metrics | None = None,
        spawn: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.store = store
        self.tier = tier
        self.stall_timeout = stall_timeout
        self.metrics = metrics
        self.spawn = spawn or functools.partial(spawn_thread, name="tier-copy")
        self._broke: dict[Digest, float] = {}  # when a copy of this process last broke off
        # Why a copy that followed a fill ended without the blob (this process's clients).
        self._errors: dict[Digest, RegistryError] = {}
        # What a copy from the bucket last broke on (told to a client whose copy stalls).
        self._broken_by: dict[Digest, RegistryError] = {}

    def open(self, digest: Digest, size: int) -> BinaryIO | None:
        """The verified local copy, counted as a tier hit; None when there is none."""
        handle = self.tier.open(digest, size)
        if handle is not None and self.metrics is not None:
            self.metrics.tier_hits.inc()
        return handle

    def forget(self, digest: Digest) -> None:
        """The bucket has no such blob (any more, a GC deleted it): neither has the tier."""
        if self.tier.forget(digest):
            log.info("local tier dropped %s: the bucket no longer has it", digest)

    # -- copying in --------------------------------------------------------------------------
    def keeps(self, size: int) -> bool:
        """Whether a blob this size goes through the tier (else: straight from the bucket,
        or a fill's pieces, per client)."""
        return self.tier.keeps(size)

    def reconcile(self, fill_running: Callable[[Digest], bool]) -> int:
        """Drop the copies of blobs the bucket no longer has: deletions the node did not hear
        of (it was stopped, or Redis failed over, while a sweep told the tiers), which the
        check on serve would only find for a copy somebody asks for. One process of the
        node at a time; a copy whose fill is running (in place before the bucket's commit)
        is kept. How many went."""
        with self.tier.reconciling() as ours:
            if not ours:
                return 0
            copies = self.tier.copies()
            if not copies:
                return 0
            in_bucket = {digest for digest, _size, _mtime in self.store.iter_blobs()}
            dropped = 0
            for digest in copies:
                if digest in in_bucket or fill_running(digest):
                    continue
                if self.store.blob_size(digest) is None and self.tier.forget(digest):
                    dropped += 1  # (asked again: committed since the listing, it stays)
            if dropped:
                log.info("local tier dropped %d copies the bucket no longer has", dropped)
            return dropped

    def node_copy(self, digest: Digest, size: int, at: int) -> TierNodeCopy | None:
        """The node's copy, for a fill this process runs to write from the bytes it hashes
        (`at` of them hashed already); None when a live process of the node holds the copy,
        it is in already, it lacks bytes before `at` (a fill resumed mid-way: the copy
        is then made from the fill's stream as it is when nobody fetches on the node), or
        the tier cannot keep a blob this size."""
        if not self.tier.keeps(size):
            return None
        copy = self.tier.claim(digest, size)
        if copy is None:
            return None
        if copy.offset < at:
            copy.close()
            return None
        self._errors.pop(digest, None)
        return TierNodeCopy(self, copy)

    def ensure_copy(self, digest: Digest, size: int, source: Source | None = None) -> bool:
        """Start copying the blob in unless a live process of the node does; True when this
        call started it. `source(offset)`: the blob's bytes from `offset` (a fill's stream);
        None: the committed object in the bucket."""
        broke = self._broke.get(digest)
        if broke is not None and time.monotonic() - broke < RETRY_AFTER:
            return False
        copy = self.tier.claim(digest, size)
        if copy is None:
            return False
        self._errors.pop(digest, None)
        if self.metrics is not None:  # the node's one read of the blob (its pieces, or object)
            self.metrics.s3_blob_reads.labels("local_tier").inc()
        self.spawn(lambda: self._copy(copy, source or self._from_bucket(copy.digest)))
        return True

    def _from_bucket(self, digest: Digest) -> Source:
        def read(offset: int) -> Iterator[bytes]:
            with self.store.open_blob(digest) as source:
                source.seek(offset)
                while True:
                    data = source.read(COPY_CHUNK)
                    if not data:
                        return
                    yield data

        return read

    def _copy(self, copy: TierCopy, source: Source) -> None:
        started = time.monotonic()
        try:
            for data in source(copy.offset):
                if copy.offset + len(data) > copy.size:
                    break  # more than the blob: the commit below refuses it
                copy.write(data)
                if self.metrics is not None:
                    self.metrics.tier_copied_bytes.inc(len(data))
                if copy.offset >= copy.size:
                    break
            self._into_place(copy, started)
        except RegistryError as exc:  # the fill it followed failed: its clients hear why
            self._ended_with_fill(copy, exc)
        except Exception as exc:  # the bucket failed: what was copied stays to resume from
            self._broke[copy.digest] = time.monotonic()
            self._broken_by[copy.digest] = storage_failure(exc) or CacheUnavailable(
                f"the local copy of {copy.digest} broke off: {type(exc).__name__}",
                reason=f"the local tier's copy broke off ({type(exc).__name__})",
            )
            log.warning("local tier copy of %s broke off: %s", copy.digest, exc)
        finally:
            copy.close()

    def _into_place(self, copy: TierCopy, started: float, how: str = "") -> None:
        """A whole copy renamed into place if its digest matches, else dropped."""
        if copy.commit():
            self._broke.pop(copy.digest, None)
            self._broken_by.pop(copy.digest, None)
            log.info(
                "local tier copied %s bytes=%d seconds=%.3f%s",
                copy.digest,
                copy.size,
                time.monotonic() - started,
                how,
            )
        else:
            log.warning("local tier copy of %s did not match its digest; dropped", copy.digest)

    def _ended_with_fill(self, copy: TierCopy, error: RegistryError) -> None:
        """The fill a copy was made from failed: its bytes are that fill's (maybe a poisoned
        upstream's), nothing to resume from; the node's clients hear why."""
        copy.discard()
        self._errors[copy.digest] = error
        self._broke[copy.digest] = time.monotonic()
        log.warning("local tier copy of %s ended with its fill: %s", copy.digest, error)

    # -- every client ----------------------------------------------------------------------------
    @overload
    def stream(
        self,
        digest: Digest,
        size: int,
        start: int,
        end: int,
        source: Source | None = None,
        *,
        spans: Literal[False] = False,
    ) -> Iterator[bytes]: ...

    @overload
    def stream(
        self,
        digest: Digest,
        size: int,
        start: int,
        end: int,
        source: Source | None = None,
        *,
        spans: Literal[True],
    ) -> Iterator[bytes | FileSpan]: ...

    def stream(
        self,
        digest: Digest,
        size: int,
        start: int,
        end: int,
        source: Source | None = None,
        *,
        spans: bool = False,
    ) -> Iterator[bytes] | Iterator[bytes | FileSpan]:
        """Bytes [start, end] of the node's copy as it grows (copied in by whoever holds it:
        from the bucket, or with `source`, following a fill still in progress). `spans`:
        as FileSpans of the copy's file, for the sender to sendfile (each span's `sent` says
        how far it got; the rest is offered again)."""
        self.ensure_copy(digest, size, source)
        handle = self.tier.follow(digest)
        pos = seen = start
        last_progress = time.monotonic()
        sleep = 0.001
        complete = self.tier.complete(digest)
        reopened = False
        try:
            while pos <= end:
                # The last byte waits for the copy's verified rename.
                limit = end + 1 if complete else min(end + 1, size - 1)
                ready = min(handle.available() if handle is not None else 0, limit)
                if ready > seen:
                    seen, last_progress = ready, time.monotonic()
                # A copy growing in small writes is sent in batches: sends of what just
                # arrived cost every client a wake-up and a read per few KiB (50 Python
                # clients spent 15 % more CPU so, and were slower).
                if pos < ready and (ready - pos >= MIN_SEND or ready == limit):
                    assert handle is not None  # `ready` was read from it
                    if spans:
                        span = FileSpan(handle.fd, pos, ready - pos)
                        yield span
                        if span.sent:
                            pos += span.sent
                            sleep = 0.001
                            continue
                    data = handle.read_at(pos, min(READ_CHUNK, ready - pos))
                    if data:
                        pos += len(data)
                        sleep = 0.001
                        yield data
                        continue
                # Nothing to send: only now look at the tier again, never per chunk.
                if not complete and self.tier.complete(digest):
                    complete = True
                    continue
                if complete and not reopened:
                    # In place, yet this reader's file may have no more: it followed a
                    # partial that was dropped (its copy broke) and copied anew. Read the
                    # one in place rather than wait out the stall timeout.
                    reopened = True
                    if handle is not None:
                        handle.close()
                    handle = self.tier.follow(digest)
                    continue
                nobody = not complete and not self.tier.copying(digest)
                error = self._errors.get(digest)
                if error is not None and nobody:
                    raise error
                if handle is None or nobody:
                    # Nobody copies it now (the copy broke off, or its process died): this
                    # client resumes it, and follows whatever file holds it now.
                    self.ensure_copy(digest, size, source)
                    if handle is not None:
                        handle.close()
                    handle = self.tier.follow(digest)
                if time.monotonic() - last_progress > self.stall_timeout:
                    # The bucket's last failure when there was one, not only "stalled".
                    raise self._broken_by.get(digest) or CacheUnavailable(
                        f"the local copy of {digest} stopped growing",
                        reason="the local tier's copy stalled",
                    )
                time.sleep(sleep)
                sleep = min(sleep * 2, 0.02)
        finally:
            if handle is not None:
                handle.close()


class TierNodeCopy:
    """The node's copy of a blob written by the fill that fetches it, in this process: the
    bytes the fill hashes, in order from the blob's first (pullthrough/fill.py), go to the
    copy too. The node's clients stream it as they would a copy from the bucket, with no
    read of the bucket's pieces and no lag behind the fill. The copy hashes for itself: it
    may have resumed what a dead process left."""

    def __init__(self, serving: TierServing, copy: TierCopy) -> None:
        self.serving = serving
        self.copy = copy
        self.broken = False
        self.in_place = False  # verified and renamed into place, before the bucket's commit
        self.started = time.monotonic()

    def write(self, pos: int, data: bytes) -> None:
        """The fill's bytes at `pos`; what the copy holds already is skipped."""
        copy = self.copy
        if self.broken or pos + len(data) <= copy.offset:
            return
        try:
            if pos > copy.offset:  # never: the fill hashes from the blob's first byte
                raise ValueError(f"a gap at {copy.offset} in the local copy of {copy.digest}")
            data = data[copy.offset - pos :] if pos < copy.offset else data
            copy.write(data)
        except (OSError, ValueError) as exc:
            # The node's disk, not the fill's: the fill goes on; the node's clients follow
            # the fill by way of a copy another request starts (tiering.stream).
            self.broken = True
            copy.discard()
            copy.close()  # its flock goes: a request of the node may start a copy anew
            log.warning("local tier copy of %s written by its fill failed: %s", copy.digest, exc)
            return
        if self.serving.metrics is not None:
            self.serving.metrics.tier_copied_bytes.inc(len(data))

    def verified(self) -> None:
        """The fill's bytes hash to the digest: the copy goes into place (its clients' last
        byte) before the bucket's copy of the blob, which takes seconds."""
        if self.broken:
            return
        try:
            self.serving._into_place(self.copy, self.started, " (written by its fill)")
            self.in_place = True
        except OSError as exc:  # the node's disk: the fill and its commit go on
            log.warning(
                "local tier copy of %s could not be put in place: %s", self.copy.digest, exc
            )
            self.copy.discard()

    def failed(self, error: RegistryError) -> None:
        """The fill failed: the node's clients hear why. A copy already in place goes: the
        bucket never got the blob, and the tier holds only what the bucket has. A copy that
        broke is left alone: its file may be another copy's by now, which hears of the
        failure from the fill."""
        if self.in_place:
            self.serving.tier.forget(self.copy.digest)
            log.warning(
                "local tier dropped %s: its fill failed after the copy: %s", self.copy.digest, error
            )
        elif not self.broken:
            self.serving._ended_with_fill(self.copy, error)

    def close(self) -> None:
        """Lets the copy go (a fill that lost its lease leaves it to be resumed)."""
        self.copy.close()
