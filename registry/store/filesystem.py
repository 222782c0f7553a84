"""The filesystem storage driver: files under one root directory.

Every path is checked again to resolve under the root, so no request can touch a file
outside it. A commit is an atomic rename after the content is synced.

A parallel fill (pullthrough/ranges.py) writes its ranges into the upload at their offsets
where the filesystem keeps user extended attributes (ext4, xfs, btrfs, tmpfs): an upload
that has bytes past a gap carries `user.pullthrough.prefix` (how many bytes from its start
are the blob's, written in order) and `user.pullthrough.extents` (JSON `[[start, end], ...]`:
ranges past that which are written too, for a takeover). Without the attribute the file's
size is its bytes in order, as for every one-stream fill. The attribute is set before the
first byte past a gap is written, and removed only once the file is whole, so a follower
that reads the size first and the attribute second never reads a hole. Elsewhere a range
ahead goes to a side file (paths.extent), copied in when the bytes in order reach it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from registry.offload import WriteBehind
from registry.store import paths
from registry.store.driver import Follower

log = logging.getLogger(__name__)

PREFIX_XATTR = "user.pullthrough.prefix"
EXTENTS_XATTR = "user.pullthrough.extents"
# Room left for the extents in the attribute (ext4 keeps all of a file's in one 4 KiB block):
# the ranges nearest the bytes in order are kept; one left out is only fetched again by a
# takeover.
EXTENTS_XATTR_MAX = 2048
# A fill's written bytes are sent to the disk in steps of this as it goes.
WRITEBACK_STEP = 8 << 20
# No mark: none set, no such file, or a filesystem without user attributes (side files).
_NO_MARK = (errno.ENODATA, errno.ENOENT, errno.ENOTDIR, errno.ENOTSUP, errno.EOPNOTSUPP)


def _marked_prefix(target: int | str) -> int | None:
    """The bytes in order of an upload written past a gap (by descriptor or path), or None
    when it has none: then its size is its bytes in order."""
    try:
        return int(os.getxattr(target, PREFIX_XATTR))
    except OSError as exc:
        if exc.errno in _NO_MARK:
            return None
        raise


def _in_order(size: int, target: int | str) -> int:
    """Bytes in order of a file of `size` bytes: its size, or its mark where it has one."""
    prefix = _marked_prefix(target)
    return size if prefix is None else min(size, prefix)


def _unmark(fd: int) -> None:
    for name in (PREFIX_XATTR, EXTENTS_XATTR):
        try:
            os.removexattr(fd, name)
        except OSError as exc:
            if exc.errno not in _NO_MARK:
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


class LocalFollower:
    """A file followed by descriptor: what it has grown to, or, while a parallel fill has
    written it past a gap, its bytes in order."""

    def __init__(self, path: str, handle: BinaryIO) -> None:
        self.path = path
        self.handle = handle
        self.fd = handle.fileno()

    def available(self) -> int:
        # The size before the mark: a mark read after it covers every byte past a gap.
        return _in_order(os.fstat(self.fd).st_size, self.fd)

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
        # and two threads only waited for each other's (a mark set while a range's write
        # held the file's lock: 0.5 s of a 1 GiB fill).
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
        self._end = _in_order(os.fstat(self.fd).st_size, self.fd)
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


class FilesystemDriver:
    """Files under one root directory."""

    # How long a follower with nothing to send waits, at most, before it looks again.
    poll_interval = 0.02
    lookups_are_requests = False
    supports_extents = True

    def __init__(
        self, root: Path, file_mode: int = 0o640, extents_in_place: bool | None = None
    ) -> None:
        # Cached content may be private images: not for every local user (less the umask).
        self.file_mode = file_mode
        self.dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # x wherever r: 0640 -> 0750
        self.root = Path(root).resolve()
        self._root = str(self.root)
        self._root_prefix = self._root + os.sep
        if not self.root.exists():
            # The root closes the tree to other users; what is below inherits nothing.
            self.root.mkdir(self.dir_mode, parents=True, exist_ok=True)
        self._extents_in_place = extents_in_place
        # The writer of each upload open for writing in this process, by path, for the
        # ranges written into it in place.
        self._writers: weakref.WeakValueDictionary[str, WriteBehind] = weakref.WeakValueDictionary()

    @property
    def extents_in_place(self) -> bool:
        """Ranges ahead are written into the fill where the filesystem keeps the attribute
        that marks its bytes in order; else side files, copied in (twice the writes). Asked
        of the filesystem at the first parallel fill, not by every process that opens the
        store (the GC, a node's tier)."""
        if self._extents_in_place is None:
            self._extents_in_place = self._keeps_user_xattrs()
        return self._extents_in_place

    def _keeps_user_xattrs(self) -> bool:
        probe = self.local_path(paths.temporary(f"xattr-{uuid.uuid4().hex}"))
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_RDWR | os.O_CREAT, self.file_mode)
            try:
                os.setxattr(fd, PREFIX_XATTR, b"0")
                return True
            finally:
                os.close(fd)
                probe.unlink()
        except OSError as exc:
            log.info(
                "%s keeps no user attributes (%s): parallel ranges use side files",
                self.root,
                exc.strerror,
            )
            return False

    def local_path(self, path: str) -> Path:
        return Path(self._local(path))

    def _local(self, path: str) -> str:
        # Strings, not Paths, on the request path: pathlib costs more than the read itself.
        full = os.path.normpath(os.path.join(self._root, path))
        if not full.startswith(self._root_prefix) or "\x00" in path:
            raise ValueError(f"path escapes the storage root: {path!r}")
        return full

    def stat(self, path: str) -> int | None:
        try:
            return os.stat(self._local(path)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def mtime(self, path: str) -> float | None:
        try:
            return os.stat(self._local(path)).st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None

    def open_read(self, path: str) -> BinaryIO:
        return open(self._local(path), "rb")

    def read(self, path: str) -> bytes | None:
        try:
            with open(self._local(path), "rb", buffering=0) as handle:
                return handle.readall()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_atomic(self, path: str, data: bytes) -> None:
        target = self.local_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.local_path(paths.temporary(uuid.uuid4().hex))
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.file_mode)
            with open(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fdatasync(handle.fileno())
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def touch(self, path: str) -> None:
        target = self.local_path(path)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(self.file_mode)

    def open_partial(
        self, path: str, size: int | None = None, commit_to: str | None = None
    ) -> PartialFile:
        self.local_path(path).parent.mkdir(parents=True, exist_ok=True)
        partial = PartialFile(self, path)
        self._writers[path] = partial._writes
        return partial

    def forget_writer(self, path: str, writes: WriteBehind) -> None:
        """The upload at `path` let go of its writer: ranges opened later get their own."""
        if self._writers.get(path) is writes:
            del self._writers[path]

    def open_partial_read(self, path: str) -> LocalFollower | None:
        try:
            return LocalFollower(path, open(self._local(path), "rb"))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def is_same_file(self, handle: Follower, path: str) -> bool | None:
        # By inode: a restarted fill is a new file at the same path.
        assert isinstance(handle, LocalFollower)  # this driver's own (open_partial_read)
        try:
            return os.stat(self._local(path)).st_ino == os.fstat(handle.fd).st_ino
        except (FileNotFoundError, NotADirectoryError):
            return None

    def partial_size(self, path: str) -> int | None:
        local = self._local(path)
        try:
            return _in_order(os.stat(local).st_size, local)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def extent_alignment(self, size: int) -> int:
        return 64 << 10

    def open_extent(
        self, path: str, offset: int, size: int | None = None, held: int = 0
    ) -> PartialFile | UploadExtent:
        """A range of the fill at `path` that starts at `offset`: the upload itself from
        there, or its side file (`pwrite(data, 0)` is the byte at `offset` either way)."""
        if self.extents_in_place:
            return UploadExtent(self, path, offset, held, self._writers.get(path))
        return PartialFile(self, paths.extent(path, offset))

    def extents(self, path: str) -> list[tuple[int, int]]:
        """(offset, size) of the ranges of the fill at `path` written past its bytes in
        order (its attribute, or its side files), by offset."""
        if self.extents_in_place:
            try:
                value = os.getxattr(self._local(path), EXTENTS_XATTR)
            except OSError as exc:
                if exc.errno in _NO_MARK:
                    return []
                raise
            return sorted((start, end - start) for start, end in json.loads(value))
        return self._side_files(path)

    def _side_files(self, path: str) -> list[tuple[int, int]]:
        folder = path.rpartition("/")[0]
        out = []
        for entry in self.list(folder):
            parsed = paths.extent_offset(f"{folder}/{entry}")
            if parsed is not None and parsed[0] == path:
                size = self.stat(f"{folder}/{entry}")
                if size is not None:
                    out.append((parsed[1], size))
        return sorted(out)

    def list_partials(self, path: str) -> Iterator[tuple[str, float]]:
        """(partial path, newest mtime) of every fill, its side files counted with it."""
        partials: dict[str, float] = {}
        for rel, _size, mtime in self.walk_stat(path):
            parsed = paths.extent_offset(rel)
            key = parsed[0] if parsed is not None else rel
            partials[key] = max(partials.get(key, 0.0), mtime)
        yield from partials.items()

    def delete_partial(self, path: str) -> bool:
        deleted = self.delete(path)
        for offset, _size in self._side_files(path):
            deleted = self.delete(paths.extent(path, offset)) or deleted
        return deleted

    def presign(self, path: str, expires: int) -> str | None:
        return None

    def delete(self, path: str) -> bool:
        try:
            os.unlink(self.local_path(path))
            return True
        except FileNotFoundError:
            return False

    def list(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self.local_path(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def walk_files(self, path: str) -> Iterator[str]:
        base = self.local_path(path)
        for dirpath, _dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for filename in filenames:
                yield f"{rel}/{filename}"

    def walk_stat(self, path: str) -> Iterator[tuple[str, int, float]]:
        # scandir: the stat comes with the directory read, one syscall less per file.
        stack = [path]
        while stack:
            current = stack.pop()
            try:
                entries = list(os.scandir(self.local_path(current)))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                rel = f"{current}/{entry.name}"
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(rel)
                    elif entry.is_file(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        yield rel, info.st_size, info.st_mtime
                except FileNotFoundError:
                    continue  # deleted while we walked

    def prune(self, path: str, stop: str) -> None:
        current = self.local_path(path)
        limit = self.local_path(stop)
        while current != limit and str(current).startswith(str(limit) + os.sep):
            try:
                current.rmdir()
            except OSError:  # not empty (or gone): stop here
                return
            current = current.parent

    def prune_tree(self, path: str, stop: str) -> None:
        base = self.local_path(path)
        for dirpath, _dirnames, _filenames in os.walk(base, topdown=False):
            if dirpath != str(base):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        self.prune(path, stop)

    def abort_stale_multipart(self, older_than: float) -> int:
        return 0  # a commit on disk is one rename: nothing is left half-done
