"""Writing a fill to S3 as pieces: the fill's bytes in order (PieceWriter) and a range of a
parallel fill ahead of them (ExtentPieces)."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from typing import TYPE_CHECKING, Any

from registry.store.s3.copies import PartCopies
from registry.store.s3.readers import PieceReader

if TYPE_CHECKING:
    from registry.store.s3.driver import S3Driver


class PieceWriter:
    """The fetcher's side of a fill on S3: bytes in order, a piece PUT whenever one is whole.

    The PUT runs in the background (a thread, a greenlet under gevent) while the next piece
    is received: a parallel fill writes under its one lock (ranges.py), so a PUT made in
    place held every range of the fill still while it went. A piece whole before the one
    before it is stored waits for that one: at most two pieces per writer in memory."""

    def __init__(
        self,
        driver: S3Driver,
        path: str,
        piece_size: int,
        start: int = 0,
        register: bool = True,
        commit_to: str | None = None,
    ) -> None:
        self.driver = driver
        self.path = path
        self.piece_size = piece_size
        self._start = start  # the first byte not stored (all before it are pieces)
        self._sending = b""  # the piece being PUT, from _start
        self._buffer = bytearray()  # the bytes after it
        self._putting: threading.Thread | None = None
        self._put_failed: BaseException | None = None
        self._follower: PieceReader | None = None  # reads back stored pieces (resume)
        # Followers of this process read the buffer while a piece upload yields.
        self._lock = threading.Lock()
        self._local = (driver.bucket, driver.key(path))
        self._register = register
        if register:  # the fill's own writer, not one of its ranges (ExtentPieces)
            self.driver.writing[self._local] = self
        self._parts = (
            PartCopies(driver, path, commit_to, piece_size) if register and commit_to else None
        )

    def end(self) -> int:
        with self._lock:
            return self._start + len(self._sending) + len(self._buffer)

    def stored(self) -> int:
        return self._start

    def publish(self, stored: int, extents: list[tuple[int, int]]) -> None:
        """Nothing to do: followers learn of new pieces from the fill record."""

    def read_buffered(self, pos: int, length: int) -> bytes:
        """Bytes at `pos` not yet stored as a piece (some of them: those of the piece being
        PUT, or of the buffer); empty when `pos` is not held."""
        with self._lock:
            at = pos - self._start
            if 0 <= at < len(self._sending):
                return self._sending[at : at + length]
            at -= len(self._sending)
            if at < 0 or at >= len(self._buffer):
                return b""
            return bytes(self._buffer[at : at + length])

    def pwrite(self, data: bytes, offset: int) -> None:
        if offset != self.end():
            self._sent()
            if offset != self.driver.partial_size(self.path) or self._buffer:
                raise ValueError(f"pieces are written in order: {offset} is not the next byte")
            with self._lock:
                self._start = offset  # resuming after the pieces an earlier fill left
        with self._lock:
            self._buffer += data
        while len(self._buffer) >= self.piece_size:
            self._sent()
            with self._lock:
                self._sending = bytes(self._buffer[: self.piece_size])
                del self._buffer[: self.piece_size]
            self._putting = threading.Thread(target=self._put_sending, name="s3-piece", daemon=True)
            self._putting.start()

    def _put_sending(self) -> None:
        try:
            self._put(self._sending)
        except BaseException as exc:  # the writer's next call raises it
            self._put_failed = exc

    def _put(self, piece: bytes) -> None:
        """PUT the piece at _start (the one being sent, or the buffer's when none is)."""
        offset = self._start
        self.driver.write_atomic(self.driver.piece_path(self.path, offset), piece)
        with self._lock:
            if self._sending is piece:
                self._sending = b""
            else:
                del self._buffer[: len(piece)]
            self._start += len(piece)
        # A range's pieces go into the commit its fill's writer began in this process.
        parts = self._parts if self._register else self.driver.assembling.get(self._local)
        if parts is not None:
            parts.stored(offset, len(piece))

    def _sent(self, raising: bool = True) -> None:
        """Wait for the piece being PUT; its failure is raised by the writer's next call."""
        thread, self._putting = self._putting, None
        if thread is not None:
            thread.join()
        if raising and self._put_failed is not None:
            raise self._put_failed

    def truncate(self, size: int = 0) -> None:
        if size:
            raise ValueError("pieces are only ever dropped whole")
        self._sent(raising=False)
        with self._lock:
            self._buffer.clear()
            self._start = 0
            self._put_failed = None
        if self._parts is not None:  # the pieces are written again: so is their commit
            self._parts.cancel()
            self._parts = PartCopies(self.driver, self.path, self._parts.dest, self.piece_size)
        self.driver.delete_partial(self.path)

    def flush(self) -> None:
        """Store what the buffer holds as a piece (the blob's last, shorter one)."""
        self._sent()
        if self._buffer:
            self._put(bytes(self._buffer))

    def settle(self, size: int) -> None:
        """Every piece up to `size` is stored, some by a parallel fill's ranges: commit
        that many bytes."""
        self.flush()
        with self._lock:
            self._start = size

    def read_range(self, offset: int, length: int) -> bytes:
        """Bytes of the pieces already stored (to hash the prefix when resuming)."""
        if self._follower is None:
            self._follower = PieceReader(self.driver, self.path)
        if offset >= self._follower.available():
            return b""
        return self._follower.read_at(offset, length)

    def commit(self, dest: str) -> None:
        """Store the whole blob at `dest` in one step, then drop the pieces."""
        driver = self.driver
        self._sent()
        if self._start == 0:
            # Smaller than a piece: all in memory, one PUT. No piece was stored (each one
            # moves _start), so there is nothing to delete.
            driver.write_atomic(dest, bytes(self._buffer))
            self._forget()
            return
        self.flush()
        pieces, total = [], 0
        for offset, size, _mtime in driver.pieces(self.path):
            if offset != total:
                break  # a gap: not whole
            pieces.append((offset, size))
            total += size
        if total != self._start:
            if driver.stat(dest) == self._start:
                # Another fetcher (a lease lost in a Redis failover) committed this digest and
                # dropped the pieces: the same verified bytes are there.
                self.discard()
                return
            raise OSError(errno.EIO, f"the pieces of {self.path} on {driver.name} are not whole")
        parts = self._parts
        if parts is None or parts.dest != dest:
            if parts is not None:
                parts.cancel()
            parts = PartCopies(driver, self.path, dest, self.piece_size, register=False)
        self._parts = None
        parts.complete(pieces)
        if driver.stat(dest) != total:
            raise OSError(errno.EIO, f"{dest} on {driver.name} is not {total} bytes after commit")
        self.discard()

    def discard(self) -> None:
        self._forget()
        self.driver.delete_partial(self.path)

    def _forget(self) -> None:
        # A piece PUT after its fill's pieces were deleted would be left behind.
        self._sent(raising=False)
        if self.driver.writing.get(self._local) is self:
            del self.driver.writing[self._local]
        with self._lock:
            self._buffer = bytearray()
        if self._parts is not None:  # the fill ends without this commit
            self._parts.cancel()
            self._parts = None

    def close(self) -> None:
        self._forget()
        if self._follower is not None:
            self._follower.close()


class ExtentPieces:
    """A range of a parallel fill that arrived ahead of the bytes in order (ranges.py): its
    bytes are pieces of the fill from `offset` on (on the pieces' grid, so nothing moves
    when the fill reaches them), and are kept in a local spool file until they are hashed
    in order. One adopted from a fetcher that died has no spool: its pieces are read back."""

    def __init__(
        self, driver: S3Driver, path: str, offset: int, piece_size: int, *, stored: int = 0
    ) -> None:
        self.path = path
        self.offset = offset
        # `stored`: bytes of this range already in the store (adopted from a dead fetcher).
        self._writer = PieceWriter(driver, path, piece_size, start=offset + stored, register=False)
        # Closed by close(); a temporary file is gone from the disk once closed.
        self._spool: Any = None if stored else tempfile.TemporaryFile()  # noqa: SIM115
        self._reader = PieceReader(driver, path, start=offset) if stored else None

    def pwrite(self, data: bytes, offset: int, keep: bool = True) -> None:
        """`data` at `offset` from the range's start; `keep`: spool it too (not yet hashed)."""
        self._writer.pwrite(data, self.offset + offset)
        if keep and self._spool is not None:
            os.pwrite(self._spool.fileno(), data, offset)

    def stored(self) -> int:
        """The end of this range's bytes in the store (an offset in the blob)."""
        return self._writer.stored()

    def read_range(self, offset: int, length: int) -> bytes:
        if self._spool is not None:
            return os.pread(self._spool.fileno(), length, offset)
        assert self._reader is not None
        at = self.offset + offset
        if at >= self._reader.available():
            return b""
        return self._reader.read_at(at, length)

    def flush(self) -> None:
        self._writer.flush()

    def truncate(self, size: int = 0) -> None:
        raise ValueError("a range's pieces are dropped with the fill's")

    def commit(self, dest: str) -> None:
        raise ValueError("a range is committed with the fill it belongs to")

    def discard(self) -> None:
        """Drop what this range holds apart from the fill: its spool (its pieces are the
        fill's, dropped with it)."""
        self.close()

    def close(self) -> None:
        self._writer.close()  # waits for the piece it is storing
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._reader is not None:
            self._reader.close()
