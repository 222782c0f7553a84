"""A fill's files on a local disk: the upload written at explicit offsets (its writes handed
to a thread of their own, marked with its bytes in order while it has bytes past a gap), a
range written into it or into a side file, and a reader that follows it as it grows. The
driver that opens them is filesystem.py; the marks are documented there."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
from typing import TYPE_CHECKING, Any, BinaryIO

from registry.offload import WriteBehind

if TYPE_CHECKING:
    from registry.store.filesystem import FilesystemDriver

log = logging.getLogger("registry.store.filesystem")

PREFIX_XATTR = "user.pullthrough.prefix"
EXTENTS_XATTR = "user.pullthrough.extents"
# Room left for the extents in the attribute (ext4 keeps all of a file's in one 4 KiB block):
# the ranges nearest the bytes in order are kept; one left out is only fetched again by a
# takeover.
EXTENTS_XATTR_MAX = 2048
# A fill's written bytes are sent to the disk in steps of this as it goes.
WRITEBACK_STEP = 8 << 20
# No mark: none set, no such file, or a filesystem without user attributes (side files).
NO_MARK = (errno.ENODATA, errno.ENOENT, errno.ENOTDIR, errno.ENOTSUP, errno.EOPNOTSUPP)


def _marked_prefix(target: int | str) -> int | None:
    """The bytes in order of an upload written past a gap (by descriptor or path), or None
    when it has none: then its size is its bytes in order."""
    try:
        return int(os.getxattr(target, PREFIX_XATTR))
    except OSError as exc:
        if exc.errno in NO_MARK:
            return None
        raise


def in_order(size: int, target: int | str) -> int:
    """Bytes in order of a file of `size` bytes: its size, or its mark where it has one."""
    prefix = _marked_prefix(target)
    return size if prefix is None else min(size, prefix)


def _unmark(fd: int) -> None:
    for name in (PREFIX_XATTR, EXTENTS_XATTR):
        try:
            os.removexattr(fd, name)
        except OSError as exc:
            if exc.errno not in NO_MARK:
                raise


@functools.cache
def _writeback_call() -> Any:
    """libc's sync_file_range (Linux), or None: the os module has no form of it. Looked up
    at the first fill's first step, not at import."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing [offset, offset + length) of `fd` to the disk, without waiting for it:
    the commit's fdatasync then waits only for what was written since (a 1 GiB fill's
    fdatasync took 0.5 s, all of it after the last byte, with its clients waiting). Only
    advice: where it is missing or fails, the commit's fdatasync writes everything."""
    call = _writeback_call()
    if call is not None:
        call(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    """All of `data` at `offset`; where it ends."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
    return offset


class LocalGrowingReader:
    """A file followed by descriptor: what it has grown to, or, while a parallel fill has
    written it past a gap, its bytes in order."""

    def __init__(self, path: str, handle: BinaryIO) -> None:
        self.path = path
        self.handle = handle
        self.fd = handle.fileno()

    def available(self) -> int:
        # The size before the mark: a mark read after it covers every byte past a gap.
        return in_order(os.fstat(self.fd).st_size, self.fd)

    def read_at(self, pos: int, length: int) -> bytes:
        return os.pread(self.fd, length, pos)

    def expect(self, stored: int | None) -> None:
        """Nothing to do: a stat is cheap."""

    def close(self) -> None:
        self.handle.close()


class _Written:
    """A descriptor written at explicit offsets, its writes handed to a thread of their own
    (offload.WriteBehind): what was written so far ends at `stored()`; a read, a flush and
    a close wait for the rest. Every WRITEBACK_STEP written, the disk is asked to start
    writing them (the commit's fdatasync is left the tail)."""

    fd: int
    _end: int

    def __init__(self, writes: WriteBehind | None = None) -> None:
        # One file's descriptors in one process share one writer (`writes`, owned by the
        # descriptor that made it): the kernel runs a file's writes one at a time anyway,
        # and two threads would only wait for each other's.
        self._owns_writes = writes is None
        self._writes = WriteBehind() if writes is None else writes
        self._unsynced: int | None = None  # where the bytes not yet sent to the disk begin

    def _submit(self, data: bytes, offset: int) -> None:
        self._writes.submit(self._write, data, offset)

    def _write(self, data: bytes, offset: int) -> None:
        end = _pwrite_all(self.fd, data, offset)
        self._end = max(self._end, end)
        if self._unsynced is None or offset < self._unsynced:
            self._unsynced = offset  # the first write, or one before the run not yet sent
        if end - self._unsynced >= WRITEBACK_STEP:
            _start_writeback(self.fd, self._unsynced, end - self._unsynced)
            self._unsynced = end

    def _pread(self, length: int, offset: int) -> bytes:
        self._writes.wait()
        return os.pread(self.fd, length, offset)

    def stored(self) -> int:
        """Where the bytes written so far end (not those still being handed over)."""
        return self._end

    def flush(self) -> None:
        """Every pwrite is in the file."""
        self._writes.wait()

    def _let_go(self) -> None:
        """Done with the writer: ended where this descriptor owns it, else waited for."""
        if self._owns_writes:
            self._writes.close()
        else:
            with contextlib.suppress(Exception):  # raised to the writer's owner as well
                self._writes.wait()

    def close(self) -> None:
        self._let_go()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class PartialFile(_Written):
    """A file being filled at explicit offsets; committed by an atomic rename."""

    def __init__(self, driver: FilesystemDriver, path: str) -> None:
        super().__init__()
        self._driver = driver
        self.path = path
        self.fd = os.open(driver.local_path(path), os.O_RDWR | os.O_CREAT, driver.file_mode)
        # A fill resumed: what it holds in order (its size, or its mark).
        self._end = in_order(os.fstat(self.fd).st_size, self.fd)
        # Whether a range past a gap marked the file (set by another descriptor: looked up
        # until it has, then known until this file unmarks itself).
        self._marked = False
        self._published: tuple[int, list[tuple[int, int]]] | None = None

    def pwrite(self, data: bytes, offset: int) -> None:
        self._submit(data, offset)

    def _let_go(self) -> None:
        self._driver.forget_writer(self.path, self._writes)
        super()._let_go()

    def truncate(self, size: int = 0) -> None:
        self._writes.wait()
        os.ftruncate(self.fd, size)
        self._end = min(self._end, size)
        prefix = _marked_prefix(self.fd)
        if prefix is not None and prefix >= size:
            self._unmark()  # no gap left: its bytes are its bytes in order again

    def _unmark(self) -> None:
        _unmark(self.fd)
        self._marked = False
        self._published = None

    def publish(self, stored: int, extents: list[tuple[int, int]]) -> None:
        """Where the fill's ranges are written in place: its bytes in order and the ranges
        written past them, for followers and a takeover (once the first range past a gap
        marked the file). Set by the writer thread, after the writes handed over before it:
        setting an attribute waits for the file's lock, which each write holds, and on the
        hub that held every client of the worker still (0.6 s of a loopback 1 GiB fill).
        `stored` counts written bytes only, so the mark is never ahead of them."""
        if not self._marked:
            self._marked = _marked_prefix(self.fd) is not None
            if not self._marked:
                return
        if self._published == (stored, extents):
            return
        self._published = (stored, extents)
        self._writes.submit(self._mark, stored, extents)

    def _mark(self, stored: int, extents: list[tuple[int, int]]) -> None:
        os.setxattr(self.fd, PREFIX_XATTR, str(stored).encode())
        value = b""
        for start, end in extents:
            item = f"[{start},{end}]".encode()
            if len(value) + len(item) + 3 > EXTENTS_XATTR_MAX:
                break
            value += (b"," if value else b"") + item
        os.setxattr(self.fd, EXTENTS_XATTR, b"[" + value + b"]")

    def read_range(self, offset: int, length: int) -> bytes:
        return self._pread(length, offset)

    def settle(self, size: int) -> None:
        """The first `size` bytes are the blob's: when that is the whole file, it has no gap
        left and loses its mark (side files were copied in as the bytes in order reached
        them)."""
        self._writes.wait()
        if os.fstat(self.fd).st_size == size:
            self._unmark()

    def commit(self, dest: str) -> None:
        """Make the content durable and move it to `dest` in one step."""
        self._writes.wait()
        self._unmark()
        os.fdatasync(self.fd)
        target = self._driver.local_path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self._driver.local_path(self.path), target)
        except FileNotFoundError:
            # Another fetcher of this digest (its lease lost in a Redis failover) committed
            # the file first: the same verified bytes are there.
            if self._driver.stat(dest) != self._end:
                raise

    def discard(self) -> None:
        self._let_go()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._driver.local_path(self.path))


class UploadExtent(_Written):
    """A range of a parallel fill written into the upload itself at its offset (the
    filesystem keeps user attributes): `pwrite(data, 0)` is the byte at `offset`."""

    def __init__(
        self,
        driver: FilesystemDriver,
        path: str,
        offset: int,
        held: int,
        writes: WriteBehind | None = None,
    ) -> None:
        super().__init__(writes)
        self.path = path
        self.offset = offset
        self.fd = os.open(driver.local_path(path), os.O_RDWR)
        self._end = offset + held
        self._marked = False

    def pwrite(self, data: bytes, offset: int, keep: bool = True) -> None:
        if not self._marked:
            # Before the first byte past a gap: from here on the file's size is not its
            # bytes in order. Until now it was (nothing was written past a gap).
            try:
                size = os.fstat(self.fd).st_size
                os.setxattr(self.fd, PREFIX_XATTR, str(size).encode(), os.XATTR_CREATE)
            except FileExistsError:
                pass
            self._marked = True
        self._submit(data, self.offset + offset)

    def read_range(self, offset: int, length: int) -> bytes:
        return self._pread(length, self.offset + offset)

    def discard(self) -> None:
        """Nothing apart from the upload: its bytes go with it."""
        self._let_go()
