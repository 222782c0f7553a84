"""Blobs of an S3 store served through the node's local tier (`storage.s3.local_cache`,
store/tier.py): committed ones, and fills in progress.

A blob with a verified local copy is served from it (sendfile, as from the filesystem
driver). Otherwise the first request of the node copies it in from the bucket, in the
background, one read of the bucket for the node whatever the number of its clients, and
every client of the node streams that copy as it grows; its last byte waits for the copy's
verified rename. A fill still in progress is copied in the same way by following it (one
follower of the fill per node instead of one per client), and a failure of that fill
reaches the node's clients. A copy whose process died is taken over by the next client that finds no
live writer (resuming from its bytes).

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
from typing import BinaryIO

from registry.digests import Digest
from registry.errors import CacheUnavailable, RegistryError, storage_failure
from registry.metrics import Metrics
from registry.offload import spawn as spawn_thread
from registry.store import ContentStore
from registry.store.tier import LocalTier, TierCopy

log = logging.getLogger(__name__)

# The blob's bytes from an offset: a fill's stream (BlobFiller.stream), or the bucket's object.
Source = Callable[[int], Iterator[bytes]]

COPY_CHUNK = 1024 * 1024
READ_CHUNK = 1024 * 1024
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
            if copy.commit():
                self._broke.pop(copy.digest, None)
                self._broken_by.pop(copy.digest, None)
                log.info(
                    "local tier copied %s bytes=%d seconds=%.3f",
                    copy.digest,
                    copy.size,
                    time.monotonic() - started,
                )
            else:
                log.warning("local tier copy of %s did not match its digest; dropped", copy.digest)
        except RegistryError as exc:  # the fill it followed failed: its clients hear why
            # Its bytes are that fill's (maybe a poisoned one's): nothing to resume from.
            copy.discard()
            self._errors[copy.digest] = exc
            self._broke[copy.digest] = time.monotonic()
            log.warning("local tier copy of %s ended with its fill: %s", copy.digest, exc)
        except Exception as exc:  # the bucket failed: what was copied stays to resume from
            self._broke[copy.digest] = time.monotonic()
            self._broken_by[copy.digest] = storage_failure(exc) or CacheUnavailable(
                f"the local copy of {copy.digest} broke off: {type(exc).__name__}",
                reason=f"the local tier's copy broke off ({type(exc).__name__})",
            )
            log.warning("local tier copy of %s broke off: %s", copy.digest, exc)
        finally:
            copy.close()

    # -- every client ----------------------------------------------------------------------------
    def stream(
        self, digest: Digest, size: int, start: int, end: int, source: Source | None = None
    ) -> Iterator[bytes]:
        """Bytes [start, end] of the node's copy as it grows (copied in by whoever holds it:
        from the bucket, or with `source`, following a fill still in progress)."""
        self.ensure_copy(digest, size, source)
        handle = self.tier.follow(digest)
        pos = start
        last_progress = time.monotonic()
        sleep = 0.001
        complete = self.tier.complete(digest)
        try:
            while pos <= end:
                # The last byte waits for the copy's verified rename.
                limit = end + 1 if complete else min(end + 1, size - 1)
                available = handle.available() if handle is not None else 0
                if pos < min(available, limit):
                    data = handle.read_at(pos, min(READ_CHUNK, min(available, limit) - pos))
                    if data:
                        pos += len(data)
                        last_progress = time.monotonic()
                        sleep = 0.001
                        yield data
                        continue
                # Nothing to send: only now look at the tier again, never per chunk.
                if not complete and self.tier.complete(digest):
                    complete = True
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
