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
import json
import logging
import os
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from registry.offload import WriteBehind
from registry.store import paths
from registry.store.driver import GrowingReader
from registry.store.partial_files import (
    EXTENTS_XATTR,
    NO_MARK,
    PREFIX_XATTR,
    LocalGrowingReader,
    PartialFile,
    UploadExtent,
    in_order,
)

log = logging.getLogger(__name__)


def file_version(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """What changes whenever the file at `path` is replaced or rewritten: its inode, mtime
    and size (one stat). None when nothing is there, or it cannot be looked at (a reader of
    it then meets the reason)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


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

    def version(self, path: str) -> tuple[int, int, int] | None:
        """What changes whenever the file at `path` is replaced (every write here is a rename
        of a new file): its inode, mtime and size. None when nothing is there."""
        return file_version(self._local(path))

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

    def open_partial_read(self, path: str) -> LocalGrowingReader | None:
        try:
            return LocalGrowingReader(path, open(self._local(path), "rb"))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def is_same_file(self, handle: GrowingReader, path: str) -> bool | None:
        # By inode: a restarted fill is a new file at the same path.
        assert isinstance(handle, LocalGrowingReader)  # this driver's own (open_partial_read)
        try:
            return os.stat(self._local(path)).st_ino == os.fstat(handle.fd).st_ino
        except (FileNotFoundError, NotADirectoryError):
            return None

    def partial_size(self, path: str) -> int | None:
        local = self._local(path)
        try:
            return in_order(os.stat(local).st_size, local)
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
                if exc.errno in NO_MARK:
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
