"""A node's local tier of an S3 store (`storage.s3.local_cache`): verified copies of the
bucket's blobs on the node's own disk, served from there with sendfile like the filesystem
driver's, bounded by `max_size` (least recently served first out, down to the low
watermark).

Layout under `path` (the one place it is written down):

    blobs/<algo>/<hex[:2]>/<hex>
        A verified copy of the bucket's blob: renamed here only after its size and digest
        matched. Its mtime is when it was last served (to the minute): the LRU order.
    partial/<algo>/<hex>
        A copy in progress, read by this node's clients as it grows, never served as
        complete. Its writer holds an exclusive flock(2) on it: any process of the node can
        tell a live copy from one whose process died (whose file is resumed or removed).
    reconcile
        Empty; flock(2)ed by the one process of the node comparing the tier with the bucket
        (pullthrough/tiering.py TierServing.reconcile).

Node-local on purpose: the flock is the single flight of the node's processes (one bucket
read per node per blob), with no Redis key.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from registry.config.settings import LocalCacheSettings
from registry.digests import Digest
from registry.store import paths
from registry.store.filesystem import FilesystemDriver
from registry.store.partial_files import LocalGrowingReader

log = logging.getLogger(__name__)

BLOBS = paths.BLOBS
PARTIAL = "partial"
RECONCILE = "reconcile"  # the flock of the process comparing the tier with the bucket
# A served copy's mtime is moved forward at most this often (the LRU needs no finer order).
TOUCH_EVERY = 60.0


class LocalTier:
    def __init__(
        self,
        root: Path,
        max_size: int,
        low_watermark: float = LocalCacheSettings.low_watermark,
        file_mode: int = 0o640,
        on_evict: Callable[[int], None] | None = None,
    ) -> None:
        self.disk = FilesystemDriver(root, file_mode)
        self.max_size = max_size
        self.low_watermark = low_watermark
        self.on_evict = on_evict  # called with each evicted blob's size

    @staticmethod
    def blob_path(digest: Digest) -> str:
        return paths.blob(digest)  # the filesystem store's own layout

    @staticmethod
    def partial_path(digest: Digest) -> str:
        return f"{PARTIAL}/{digest.algorithm}/{digest.hex}"

    # -- serving ---------------------------------------------------------------------------
    def open(self, digest: Digest, size: int) -> BinaryIO | None:
        """The verified local copy, open (an eviction after this does not cut the reader),
        or None when there is none of that size."""
        path = self.disk.local_path(self.blob_path(digest))
        try:
            handle = open(path, "rb")  # noqa: SIM115 - the caller sends and closes it
        except (FileNotFoundError, NotADirectoryError):
            return None
        info = os.fstat(handle.fileno())
        if info.st_size != size:
            handle.close()
            self.forget(digest)  # not the bucket's blob any more
            return None
        if time.time() - info.st_mtime > TOUCH_EVERY:
            with contextlib.suppress(OSError):
                os.utime(path)
        return handle

    def follow(self, digest: Digest) -> LocalGrowingReader | None:
        """The copy in progress (or done), as it grows."""
        for path in (self.partial_path(digest), self.blob_path(digest)):
            handle = self.disk.open_partial_read(path)
            if handle is not None:
                return handle
        return None

    def complete(self, digest: Digest) -> bool:
        return self.disk.stat(self.blob_path(digest)) is not None

    def copying(self, digest: Digest) -> bool:
        """Whether a live process of this node is copying the blob in."""
        path = self.disk.local_path(self.partial_path(digest))
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also lets go of a shared lock taken
        return False

    # -- copying in ------------------------------------------------------------------------
    def claim(self, digest: Digest, size: int) -> TierCopy | None:
        """The copy of `digest` for this process to write, resuming what a dead process left;
        None when a live one holds it, or it is in already."""
        if self.complete(digest):
            return None
        path = self.disk.local_path(self.partial_path(digest))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, self.disk.file_mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if os.fstat(fd).st_nlink == 0 or self.complete(digest):
            # Renamed (committed) or removed between our open and the lock.
            os.close(fd)
            return None
        return TierCopy(self, digest, size, fd)

    def keeps(self, size: int) -> bool:
        """Whether a blob of `size` bytes can stay in the tier once copied: one larger than
        the low watermark would be evicted by its own commit, under the clients waiting for
        its last byte. Such a blob is served from the bucket instead."""
        return size <= self.max_size * self.low_watermark

    def committed(self, copy: TierCopy) -> None:
        """A verified copy landed: keep the tier within max_size (one walk of the tier per
        copy; copies are rare next to the requests they then serve), never by evicting this
        copy, whose clients are about to see it in place."""
        self.evict(keep=self.blob_path(copy.digest))

    def evict(self, keep: str | None = None) -> int:
        """Remove the least recently served copies until the tier is at its low watermark,
        once it is past max_size; how many. A copy being read is not cut: its readers keep
        their open file. `keep`: a copy not to evict."""
        files = [(mtime, size, rel) for rel, size, mtime in self.disk.walk_stat(BLOBS)]
        total = sum(size for _mtime, size, _rel in files)
        if total <= self.max_size:
            return 0
        goal = self.max_size * self.low_watermark
        evicted = 0
        for _mtime, size, rel in sorted(files):
            if total <= goal:
                break
            if rel != keep and self.disk.delete(rel):
                total -= size
                evicted += 1
                if self.on_evict is not None:
                    self.on_evict(size)
        log.info("local tier evicted %d copies, %d bytes left", evicted, total)
        return evicted

    def usage(self) -> tuple[int, int]:
        """(copies, bytes) of the verified copies now."""
        count = total = 0
        for _rel, size, _mtime in self.disk.walk_stat(BLOBS):
            count += 1
            total += size
        return count, total

    def forget(self, digest: Digest) -> bool:
        """Drop the local copy of a blob the bucket no longer has (the GC deleted it)."""
        return self.disk.delete(self.blob_path(digest))

    def copies(self) -> list[Digest]:
        """The digests of the verified copies now."""
        found = []
        for rel, _size, _mtime in self.disk.walk_stat(BLOBS):
            parts = rel.split("/")  # blobs/<algo>/<hex[:2]>/<hex>
            with contextlib.suppress(Exception):
                found.append(Digest.parse(f"{parts[1]}:{parts[3]}"))
        return found

    @contextlib.contextmanager
    def reconciling(self) -> Iterator[bool]:
        """Whether this process is the one of the node to compare the tier with the bucket
        now (an exclusive flock on `reconcile`: the others skip it)."""
        path = self.disk.local_path(RECONCILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, self.disk.file_mode)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def clean_partials(self) -> int:
        """Remove the copies of processes that died (at start-up)."""
        removed = 0
        for rel, _size, _mtime in list(self.disk.walk_stat(PARTIAL)):
            parts = rel.split("/")
            try:
                digest = Digest.parse(f"{parts[1]}:{parts[2]}")
            except Exception:
                continue
            if not self.copying(digest) and self.disk.delete(rel):
                removed += 1
        return removed


class TierCopy:
    """One process's copy of a blob into the tier: bytes in order, hashed, renamed into
    place only when size and digest match. Closing it lets the flock go."""

    def __init__(self, tier: LocalTier, digest: Digest, size: int, fd: int) -> None:
        self.tier = tier
        self.digest = digest
        self.size = size
        self.fd = fd
        self.hasher = digest.hasher()
        self.offset = 0
        held = os.fstat(fd).st_size
        if held > size:
            os.ftruncate(fd, 0)
            held = 0
        while self.offset < held:  # resume what a dead process left: its hash first
            data = os.pread(fd, min(1 << 20, held - self.offset), self.offset)
            if not data:
                break
            self.hasher.update(data)
            self.offset += len(data)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        at = self.offset
        while view:
            written = os.pwrite(self.fd, view, at)
            view = view[written:]
            at += written
        self.hasher.update(data)
        self.offset = at

    def commit(self) -> bool:
        """Into place if whole and matching; else the partial is dropped. True on success."""
        if self.offset != self.size or self.hasher.hexdigest() != self.digest.hex:
            self.discard()
            return False
        target = self.tier.disk.local_path(self.tier.blob_path(self.digest))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.tier.disk.local_path(self.tier.partial_path(self.digest)), target)
        self.tier.committed(self)
        return True

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tier.disk.local_path(self.tier.partial_path(self.digest)))

    def close(self) -> None:
        """Lets the flock go; once (a descriptor closed twice may be someone else's)."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        with contextlib.suppress(OSError):
            os.close(fd)
