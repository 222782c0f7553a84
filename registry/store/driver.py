"""The storage driver: a small byte-level interface (read, write-then-commit-or-discard,
stat, walk, delete) that the filesystem (store/filesystem.py) and S3 (store/s3/) drivers
implement, and the one test suite both pass (tests/test_drivers.py).

Paths given to a driver are relative, `/`-separated and built only by store/paths.py from
validated names and digests.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import BinaryIO, Protocol


class StorageDriver(Protocol):
    poll_interval: float  # how often a follower with nothing to send looks again, at most
    lookups_are_requests: bool  # a stat costs a network request: followers ask Redis first
    supports_extents: bool  # a fill may store ranges ahead of its bytes in order (extents)

    # Extents are part of the fill where they lie (S3's pieces), not side files to copy in.
    @property
    def extents_in_place(self) -> bool: ...

    def stat(self, path: str) -> int | None:
        """Size in bytes, or None when nothing is there."""

    def mtime(self, path: str) -> float | None: ...

    def open_read(self, path: str) -> BinaryIO: ...

    def read(self, path: str) -> bytes | None: ...

    def version(self, path: str) -> Hashable | None:
        """What changes whenever the file at `path` is replaced, where that costs less than
        reading it (a stat); None when nothing is there, or when it would cost as much."""

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write all of `data` so that readers see the old file or the new, never a mix."""

    def touch(self, path: str) -> None: ...

    def open_partial(
        self, path: str, size: int | None = None, commit_to: str | None = None
    ) -> PartialWriter:
        """Open (creating) the partial content of a fill of `size` bytes, which readers may
        follow while it grows; committed to its final path (`commit_to`, where known: S3
        assembles the commit there as the fill goes) in one step."""

    def open_partial_read(self, path: str) -> GrowingReader | None:
        """Follow what is at `path` (a partial or a committed blob); None when nothing is."""

    def is_same_file(self, handle: GrowingReader, path: str) -> bool | None:
        """Whether `handle` follows what is now at `path`; None when nothing is there."""

    def partial_size(self, path: str) -> int | None:
        """How many bytes of the partial at `path` a fill can resume from."""

    def extent_alignment(self, size: int) -> int:
        """Where the ranges of a parallel fill of `size` bytes may start: multiples of this."""

    def open_extent(
        self, path: str, offset: int, size: int | None = None, held: int = 0
    ) -> ExtentWriter:
        """Partial content of the fill at `path` (of `size` bytes) from `offset` on (a range
        that arrived ahead of the bytes in front of it; `held` of its bytes are stored
        already, by a fill that died); `pwrite(data, 0)` writes the byte at `offset`. Only
        where `supports_extents`."""

    def extents(self, path: str) -> list[tuple[int, int]]:
        """(offset, size) of the extents of the fill at `path`, by offset."""

    def list_partials(self, path: str) -> Iterator[tuple[str, float]]:
        """(path, mtime) of every partial under `path`."""

    def delete_partial(self, path: str) -> bool: ...

    def presign(self, path: str, expires: int) -> str | None:
        """A URL that serves `path` to anyone for `expires` seconds, or None (filesystem)."""

    def delete(self, path: str) -> bool: ...

    def list(self, path: str) -> list[str]:
        """Names of the entries directly under `path` (empty when it does not exist)."""

    def walk_files(self, path: str) -> Iterator[str]:
        """Relative paths of every file under `path`."""

    def walk_stat(self, path: str) -> Iterator[tuple[str, int, float]]:
        """(relative path, size, mtime) of every file under `path`."""

    def prune(self, path: str, stop: str) -> None:
        """Remove `path` and its parents while they are empty directories, up to `stop`."""

    def prune_tree(self, path: str, stop: str) -> None:
        """Remove every empty directory under `path`, then prune `path` up to `stop`."""

    def abort_stale_multipart(self, older_than: float) -> int:
        """Abort the store's own unfinished commits older than this many seconds (S3's
        multipart uploads of nodes that died mid-commit); how many. 0 where there are none."""


class PartialWriter(Protocol):
    path: str

    def pwrite(self, data: bytes, offset: int) -> None: ...

    def stored(self) -> int:
        """How many bytes followers in other processes can read now."""

    def truncate(self, size: int = 0) -> None: ...

    def read_range(self, offset: int, length: int) -> bytes: ...

    def flush(self) -> None:
        """Store whatever is held back (S3: the last, short piece)."""

    def settle(self, size: int) -> None:
        """All `size` bytes are stored, some by extents: make the upload whole for commit."""

    def publish(self, stored: int, extents: list[tuple[int, int]]) -> None:
        """A parallel fill's ranges are written in place: its bytes in order (`stored`) and
        the [start, end) of those past them, where followers and a takeover read them from
        the store (the filesystem); nothing to do where they are told otherwise (S3)."""

    def commit(self, dest: str) -> None: ...

    def discard(self) -> None: ...

    def close(self) -> None: ...


class ExtentWriter(Protocol):
    """A range of a parallel fill stored ahead of the bytes in front of it (open_extent)."""

    def pwrite(self, data: bytes, offset: int) -> None: ...

    def stored(self) -> int:
        """How many of its bytes are stored (from its offset on)."""

    def read_range(self, offset: int, length: int) -> bytes: ...

    def flush(self) -> None: ...

    def discard(self) -> None: ...

    def close(self) -> None: ...


class FileSpan:
    """Bytes of a local file to send as they are (sendfile), never read into memory:
    `length` bytes at `offset` of the open descriptor `fd`. Whoever sends them sets `sent`
    (fewer when the file turned out shorter, or the client went away)."""

    __slots__ = ("fd", "length", "offset", "sent")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self.sent = 0


class GrowingReader(Protocol):
    """Content read while it may still grow: a fill in progress, or a committed blob."""

    path: str

    def available(self) -> int:
        """Bytes readable now."""

    def read_at(self, pos: int, length: int) -> bytes: ...

    def expect(self, stored: int | None) -> None:
        """What the writer says it has stored (None: unknown), so that a follower whose look
        is a request makes it only when there is something new."""

    def close(self) -> None: ...
