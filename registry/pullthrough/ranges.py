"""Parallel range fills: one blob fetched as several concurrent upstream Range requests.
This module is the fill's plan and bookkeeping (segments, the prefix, extents); the workers
that fetch the segments are range_workers.py's.

A fill of at least `upstream.range_min_size` whose upstream honours Range is cut into
segments; up to `upstream.parallel_ranges` workers fetch them, each taking the lowest one
nobody has, so that the bytes in order (the *prefix*) grow as fast as the ranges arrive.

Where the bytes land: a segment whose next byte is the prefix's end writes into the fill's
upload (`uploads/<algo>/<hex>`); a segment ahead of it writes an *extent*. Where the store
writes extents in place (the filesystem with user attributes, S3's pieces), that is the
upload itself at the segment's offset, and the store records how far the upload's bytes
run in order, which is what followers in any process read up to (store/filesystem.py); the
bytes are only hashed when the prefix reaches them. Elsewhere an extent is a side file
(`uploads/<algo>/<hex>.<offset>`), moved into the upload (read, hashed, written, deleted)
when the prefix reaches it. The hash runs over the prefix as it grows, so the last byte
still waits for the verified commit (fill.py).

What a fill leaves on disk (the prefix and its extents) is what a takeover resumes from:
only the bytes neither holds are asked for again. A range that breaks or stalls (the read
timeout) is asked for again from its own next byte, a few times, before the fill fails; each
request goes to the registry (a fresh redirect, without Authorization, as every blob GET).
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from registry.digests import Digest
from registry.errors import UpstreamError
from registry.offload import WriteBehind, hash_update, offload
from registry.store import ContentStore
from registry.store.driver import PartialWriter

log = logging.getLogger(__name__)

COPY_CHUNK = 1024 * 1024
# A segment is at most this, and at least MIN_SEGMENT (each one is a request, and a redirect).
MIN_SEGMENT = 8 << 20
MAX_SEGMENT = 64 << 20
# Segments per worker: small enough that the prefix grows steadily, few enough to cost
# little in requests.
SEGMENTS_PER_WORKER = 4
ALIGN = 64 << 10


class LeaseLost(Exception):
    pass


@dataclass
class Segment:
    """Bytes [start, end) of the blob: `pos` is the next one to fetch."""

    start: int
    end: int
    pos: int
    main: bool = False  # its bytes go into the fill's upload itself
    side: Any = None  # else its extent (PartialWriter), holding its bytes from side_start
    side_start: int = 0
    taken: bool = False
    attempts: int = 0

    @property
    def done(self) -> bool:
        return self.pos >= self.end


def _fresh(seg: Segment) -> bool:
    return not seg.taken and seg.pos == seg.start and seg.side is None and not seg.main


def plan_segments(
    start: int, total: int, workers: int, smallest: int = MIN_SEGMENT, align: int = ALIGN
) -> list[int]:
    """Segment boundaries of [start, total): offsets, the first `start`, the last `total`.
    Inner boundaries fall on multiples of `align`."""
    remaining = total - start
    if remaining <= 0:
        return [start]
    size = -(-remaining // (workers * SEGMENTS_PER_WORKER))
    size = max(smallest, min(MAX_SEGMENT, size))
    size = -(-size // align) * align
    bounds = [start]
    at = (start // size + 1) * size
    while at < total:
        bounds.append(at)
        at += size
    return [*bounds, total]


@dataclass
class RangedUpload:
    """The prefix of one fill (hashed, in order) and the segments around it. Every write
    goes through `write` under one lock.

    The upload itself is written in order from its start (`main_end`): by the segment at
    its end. A segment ahead writes its extent: where the store has them in place
    (`extents_in_place`) the upload's bytes where they lie (S3: its pieces, with a local
    spool to hash from), only hashed when the prefix reaches them; else a side file, copied
    into the upload when the prefix reaches it (the segment then writes the upload
    itself). In place, every write also tells the upload how far its bytes run in order and
    which ranges lie past that (`publish`: what followers and a takeover read on disk)."""

    store: ContentStore
    digest: Digest
    upload: PartialWriter
    hasher: Any
    prefix: int
    total: int
    segments: list[Segment] = field(default_factory=list)
    fetched: int = 0  # bytes this fill got from upstream
    main_end: int = -1  # where the upload's own bytes end (the prefix, unless on S3)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.in_place = self.store.extents_in_place
        # Taking an extent in (reads and hashing) goes off the gevent hub where the store is
        # a local disk; a request (S3) stays on it.
        self._local = not self.store.lookups_are_requests
        # Where the store is a local disk, the bytes in order are hashed on a thread of their
        # own, in order, while the hub reads on: waiting for each 256 KiB's hash left the
        # socket unread (a loopback fill's hub idle half its time). Waited for before an
        # extent is taken in (hashed by another thread) and as the fill settles.
        self._hashing = WriteBehind() if self._local else None
        if self.main_end < 0:
            self.main_end = self.prefix

    # -- resuming ------------------------------------------------------------------------------
    def adopt_extents(self) -> None:
        """Take in the extents an earlier fill left: those the prefix reaches are moved into
        it (hashed, and on disk copied), those past it are kept as finished segments; a side
        file the prefix already holds is deleted."""
        for offset, size in self.store.upload_extents(self.digest):
            end = offset + size
            side = self.store.open_upload_extent(self.digest, offset, None, size)
            if end <= self.prefix:
                side.discard()
                side.close()
                continue
            self.segments.append(
                Segment(offset, end, end, side=side, side_start=offset, taken=True)
            )
        self.segments.sort(key=lambda s: s.start)
        with self.lock:
            self._absorb()

    def gaps(self, start: int) -> list[tuple[int, int]]:
        """The ranges from `start` to the blob's end that no segment covers."""
        out, at = [], start
        for seg in sorted(self.segments, key=lambda s: s.start):
            if seg.end <= at:
                continue
            if seg.start > at:
                out.append((at, seg.start))
            at = max(at, seg.end)
        if at < self.total:
            out.append((at, self.total))
        return out

    def next_extent(self, start: int) -> int | None:
        """Where the first stored segment past `start` begins, if one does."""
        starts = [s.start for s in self.segments if s.start >= start]
        return min(starts) if starts else None

    # -- planning and taking -------------------------------------------------------------------
    def plan(self, start: int, workers: int, smallest: int, align: int) -> None:
        """Segments for every byte from `start` on that no segment covers yet."""
        for gap_start, gap_end in self.gaps(start):
            bounds = plan_segments(gap_start, gap_end, workers, smallest, align)
            for a, b in itertools.pairwise(bounds):
                self.segments.append(Segment(a, b, a))
        self.segments.sort(key=lambda s: s.start)

    def take(self) -> Segment | None:
        with self.lock:
            for seg in self.segments:
                if not seg.taken and not seg.done:
                    seg.taken = True
                    return seg
        return None

    def add(self, seg: Segment) -> None:
        with self.lock:
            self.segments.append(seg)
            self.segments.sort(key=lambda s: s.start)

    def coalesce(self) -> None:
        """Adjacent segments nobody has begun become one (one request for a fill that goes
        on as one stream)."""
        with self.lock:
            merged: list[Segment] = []
            for seg in self.segments:
                last = merged[-1] if merged else None
                if last is not None and _fresh(last) and _fresh(seg) and last.end == seg.start:
                    last.end = seg.end
                    continue
                merged.append(seg)
            self.segments[:] = merged

    # -- writing -------------------------------------------------------------------------------
    def write(self, seg: Segment, data: bytes) -> None:
        """`data` is the segment's next bytes: into the upload when they continue it, else
        into the segment's extent; hashed now when they continue the prefix; then whatever
        extents the prefix reaches are taken in."""
        n = len(data)
        if seg.pos + n > seg.end:
            raise UpstreamError(
                f"upstream sent more than the range {seg.start}-{seg.end - 1} of {self.digest}",
                reason="upstream sent a range longer than asked for, not cached",
            )
        with self.lock:
            if not seg.main and seg.side is None:
                if seg.pos == self.main_end == self.prefix:
                    seg.main = True
                else:
                    seg.side = self.store.open_upload_extent(self.digest, seg.pos, self.total)
                    seg.side_start = seg.pos
            at_prefix = seg.pos == self.prefix
            # On the gevent hub, as the socket reads: handing each write to a thread cost
            # more than it saved (a loopback herd 9 % slower in A/B rounds). The store's
            # own descriptors hand their disk writes to a thread (filesystem.py).
            if seg.main:
                self.upload.pwrite(data, seg.pos)
                self.main_end = seg.pos + n
            elif self.in_place:
                seg.side.pwrite(data, seg.pos - seg.side_start, keep=not at_prefix)
            else:
                seg.side.pwrite(data, seg.pos - seg.side_start)
            if at_prefix:
                if self._hashing is not None:
                    self._hashing.submit(self.hasher.update, data)
                else:
                    hash_update(self.hasher, data)
                self.prefix += n
            seg.pos += n
            self.fetched += n
            self._absorb()
            if self.in_place:
                at = self._stored()
                self.upload.publish(at, self._ahead(at))

    def _absorb(self) -> None:
        """Take in the extents the prefix has reached: hash their bytes in order (on disk,
        copying them into the upload, after which the segment writes the upload itself).
        The lock is held."""
        moved = True
        while moved:
            moved = False
            for seg in self.segments:
                if seg.side is None or not seg.side_start <= self.prefix < seg.pos:
                    continue
                if self._local:
                    # What the descriptors still hand to their writer threads lands first:
                    # the thread that takes the extent in reads it and writes after it.
                    seg.side.flush()
                    self.upload.flush()
                    if self._hashing is not None:
                        self._hashing.wait()
                    offload(self._take_in, seg)
                else:
                    self._take_in(seg)
                moved = True
                if not self.in_place:
                    seg.side.discard()
                    seg.side.close()
                    seg.side = None
                    seg.main = not seg.done

    def _take_in(self, seg: Segment) -> None:
        """The extent's bytes from the prefix to its end: hashed, and on disk copied into the
        upload (on a real thread under gevent: reads, writes and hashing release the GIL)."""
        while self.prefix < seg.pos:
            at = self.prefix - seg.side_start
            data = seg.side.read_range(at, min(COPY_CHUNK, seg.pos - self.prefix))
            if not data:
                # Our own file lost bytes: a storage failure (a 503 naming it), not upstream's.
                raise OSError(errno.EIO, f"the extent of {self.digest} at {seg.side_start} shrank")
            if not self.in_place:
                self.upload.pwrite(data, self.prefix)
                self.main_end = self.prefix + len(data)
            self.hasher.update(data)
            self.prefix += len(data)

    def stored(self) -> int:
        """Bytes in order that other processes can read: the prefix on disk; on S3 the run
        of pieces stored from the start."""
        if not self.in_place:
            return self.prefix
        with self.lock:
            return self._stored()

    def _stored(self) -> int:
        """stored(), in place, with the lock held."""
        at = self.upload.stored()
        for seg in self.segments:
            if seg.end <= at or seg.main:
                continue
            if seg.side is None or seg.side_start > at:
                break
            at = max(at, seg.side.stored())
            if at < seg.end:
                break
        return at

    def _ahead(self, at: int) -> list[tuple[int, int]]:
        """[start, end) of the bytes extents hold past `at` (the run in order), nearest
        first (the lock is held)."""
        return [
            (max(seg.side_start, at), seg.side.stored())
            for seg in self.segments
            if seg.side is not None and seg.side.stored() > max(seg.side_start, at)
        ]

    def has_extents(self) -> bool:
        """Whether bytes ahead of the prefix are stored (a takeover resumes from them)."""
        with self.lock:
            return any(seg.side is not None and seg.pos > seg.side_start for seg in self.segments)

    def settle(self) -> None:
        """Every segment is in: the hash has every byte, what extents hold back is stored,
        and the upload is whole."""
        if self._hashing is not None:
            self._hashing.wait()
        with self.lock:
            extents = False
            for seg in self.segments:
                if seg.side is not None:
                    seg.side.flush()
                    extents = True
            if extents:
                self.upload.settle(self.total)

    def remaining(self) -> int:
        """Bytes no segment holds yet."""
        with self.lock:
            return sum(s.end - s.pos for s in self.segments)

    def ranges(self) -> str:
        """Progress per segment for the fill record: `[[start, pos, end], ...]`."""
        with self.lock:
            return json.dumps([[s.start, s.pos, s.end] for s in self.segments])

    def discard_extents(self) -> None:
        with self.lock:
            for seg in self.segments:
                if seg.side is not None:
                    seg.side.discard()
                    seg.side.close()
                    seg.side = None

    def close(self) -> None:
        if self._hashing is not None:
            self._hashing.close()
        with self.lock:
            for seg in self.segments:
                if seg.side is not None:
                    seg.side.close()
                    seg.side = None
