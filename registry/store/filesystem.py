"""The filesystem storage driver: files under one root directory.

Every path is checked again to resolve under the root, so no request can touch a file
outside it. A commit is an atomic rename after the content is synced.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from registry.store import paths


class LocalFollower:
    """A file followed by descriptor: its size is whatever it has grown to."""

    def __init__(self, path: str, handle: BinaryIO) -> None:
        self.path = path
        self.handle = handle
        self.fd = handle.fileno()

    def available(self) -> int:
        return os.fstat(self.fd).st_size

    def read_at(self, pos: int, length: int) -> bytes:
        return os.pread(self.fd, length, pos)

    def expect(self, stored: int | None) -> None:
        """Nothing to do: a stat is cheap."""

    def close(self) -> None:
        self.handle.close()


class PartialFile:
    """A file being filled at explicit offsets; committed by an atomic rename."""

    def __init__(self, driver: FilesystemDriver, path: str) -> None:
        self._driver = driver
        self.path = path
        self.fd = os.open(driver.local_path(path), os.O_RDWR | os.O_CREAT, driver.file_mode)
        self._end = 0

    def pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written
        self._end = max(self._end, offset)

    def stored(self) -> int:
        return self._end

    def truncate(self, size: int = 0) -> None:
        os.ftruncate(self.fd, size)
        self._end = min(self._end, size)

    def read_range(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def flush(self) -> None:
        """Nothing held back: every pwrite is in the file."""

    def settle(self, size: int) -> None:
        """Nothing to do: the fill's bytes were copied in here as it reached them."""

    def commit(self, dest: str) -> None:
        """Make the content durable and move it to `dest` in one step."""
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._driver.local_path(self.path))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class FilesystemDriver:
    """Files under one root directory."""

    # How long a follower with nothing to send waits, at most, before it looks again.
    poll_interval = 0.02
    lookups_are_requests = False
    supports_extents = True
    extents_in_place = False  # side files, copied into the fill when it reaches them

    def __init__(self, root: Path, file_mode: int = 0o640) -> None:
        # Cached content may be private images: not for every local user (less the umask).
        self.file_mode = file_mode
        self.dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # x wherever r: 0640 -> 0750
        self.root = Path(root).resolve()
        self._root = str(self.root)
        self._root_prefix = self._root + os.sep
        if not self.root.exists():
            # The root closes the tree to other users; what is below inherits nothing.
            self.root.mkdir(self.dir_mode, parents=True, exist_ok=True)

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

    def open_partial(self, path: str, size: int | None = None) -> PartialFile:
        self.local_path(path).parent.mkdir(parents=True, exist_ok=True)
        return PartialFile(self, path)

    def open_partial_read(self, path: str) -> LocalFollower | None:
        try:
            return LocalFollower(path, open(self._local(path), "rb"))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def is_same_file(self, handle: LocalFollower, path: str) -> bool | None:
        # By inode: a restarted fill is a new file at the same path.
        try:
            return os.stat(self._local(path)).st_ino == os.fstat(handle.fd).st_ino
        except (FileNotFoundError, NotADirectoryError):
            return None

    def partial_size(self, path: str) -> int | None:
        return self.stat(path)

    def extent_alignment(self, size: int) -> int:
        return 64 << 10

    def open_extent(
        self, path: str, offset: int, size: int | None = None, held: int = 0
    ) -> PartialFile:
        """The side file of a range of the fill at `path` that starts at `offset`: its bytes
        are written at their offset from there (`pwrite(data, 0)` is the byte at `offset`)."""
        return PartialFile(self, paths.extent(path, offset))

    def extents(self, path: str) -> list[tuple[int, int]]:
        """(offset, size) of the side files of the fill at `path`, by offset."""
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
        for offset, _size in self.extents(path):
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
