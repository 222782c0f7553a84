"""Reading S3 objects: a whole object as a file (ObjectReader), and a fill in progress as
the pieces that exist so far (PieceReader)."""

from __future__ import annotations

import contextlib
import io
import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.store.s3.driver import S3Driver


class ObjectReader(io.RawIOBase):
    """A committed object, read by streaming GETs: `seek` then `read` sequentially.

    The first GET is made at open, so a missing object raises FileNotFoundError there (as
    opening a file would), and later reads continue that response while they are sequential.
    """

    def __init__(self, driver: S3Driver, path: str) -> None:
        super().__init__()
        self.driver = driver
        self.path = path
        self._pos = 0
        self._body: Any = None
        self._body_pos = -1
        self._size: int | None = None
        self._open_at(0)

    def _open_at(self, pos: int) -> None:
        self._drop()
        kwargs: dict[str, Any] = {"Key": self.driver.key(self.path)}
        if pos:
            kwargs["Range"] = f"bytes={pos}-"
        try:
            response = self.driver._call("read", self.path, "get_object", **kwargs)
        except OSError as exc:
            if _invalid_range(exc) and self._size is not None and pos >= self._size:
                self._body, self._body_pos = io.BytesIO(b""), pos
                return
            raise
        if self._size is None:
            total = response.get("ContentRange", "").rpartition("/")[2]
            self._size = int(total) if total.isdigit() else int(response["ContentLength"])
        self._body = response["Body"]
        self._body_pos = pos

    def _drop(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
        self._body = None

    def size(self) -> int:
        assert self._size is not None
        return self._size

    def available(self) -> int:
        return self.size()

    def expect(self, stored: int | None) -> None:
        """Nothing to do: a committed object does not grow."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            pos += self._pos
        elif whence == io.SEEK_END:
            pos += self.size()
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        raise io.UnsupportedOperation("an S3 object has no file descriptor")

    def read(self, n: int = -1) -> bytes:
        if self._pos >= self.size():
            return b""
        if self._body is None or self._body_pos != self._pos:
            self._open_at(self._pos)
        try:
            data = self._body.read(None if n is None or n < 0 else n)
        except Exception as exc:
            self._drop()
            raise self.driver.failure("read", self.path, exc) from None
        self._pos += len(data)
        self._body_pos = self._pos
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def read_at(self, pos: int, length: int) -> bytes:
        self._pos = pos
        return self.read(length)

    def close(self) -> None:
        self._drop()
        super().close()


def _invalid_range(exc: OSError) -> bool:
    return "InvalidRange" in str(exc)


class PieceReader:
    """A follower's view of a fill in progress on S3: the pieces that exist so far."""

    def __init__(self, driver: S3Driver, path: str, start: int = 0) -> None:
        self.driver = driver
        self.path = path
        self._known: list[tuple[int, int]] = []  # (offset, size) of pieces found, contiguous
        self._end = start
        self._looked = 0.0
        self._reader: ObjectReader | None = None
        self._reader_offset = -1
        self._local = (driver.bucket, driver.key(path))
        self._expected: int | None = None  # what the writer says it stored (via Redis)
        self._missed = -math.inf  # when a piece the writer said was stored was not there

    def available(self) -> int:
        """Bytes readable now: the contiguous pieces found, or as many as the fill record says
        are stored, and in the fetcher's own process the bytes it holds for the next piece.
        Without a word from the record, looks for the next piece (one HEAD) at most every
        `poll_interval`."""
        now = time.monotonic()
        recent_miss = now - self._missed < self.driver.poll_interval
        if self._expected is not None and self._expected > self._end and not recent_miss:
            # Stored, says the writer: each piece is found by the GET that reads it.
            stored = self._expected
        else:
            if self._expected is None and now - self._looked >= self.driver.poll_interval:
                self._find_pieces(now)
            stored = self._end
        writer = self.driver.writing.get(self._local)
        return max(stored, writer.end()) if writer is not None else stored

    def expect(self, stored: int | None) -> None:
        self._expected = stored

    def _open_next(self) -> None:
        """Open the piece at the end of those found; its size comes with its GET."""
        offset = self._end
        try:
            reader = ObjectReader(self.driver, self.driver.piece_path(self.path, offset))
        except FileNotFoundError:
            # Deleted under us (committed or discarded: the caller follows the blob), or a
            # blob smaller than a piece, stored whole at its commit: asked again after a poll.
            self._missed = time.monotonic()
            return
        if self._reader is not None:
            self._reader.close()
        self._reader, self._reader_offset = reader, offset
        self._known.append((offset, reader.size()))
        self._end += reader.size()

    def _find_pieces(self, now: float) -> None:
        self._looked = now
        while True:
            size = self.driver.stat(self.driver.piece_path(self.path, self._end))
            if not size:
                break
            self._known.append((self._end, size))
            self._end += size

    def read_at(self, pos: int, length: int) -> bytes:
        if pos >= self._end:
            writer = self.driver.writing.get(self._local)
            data = writer.read_buffered(pos, length) if writer is not None else b""
            if data:
                return data
            stored = self._expected
            if writer is not None:  # the fetcher's own process: its word is the latest
                stored = max(stored or 0, writer.stored())
            if pos == self._end and stored is not None and pos < stored:
                self._open_next()  # the writer says it is stored: one GET, no HEAD
            else:
                self._find_pieces(time.monotonic())  # stored since we last looked
        for offset, size in reversed(self._known):
            if offset <= pos < offset + size:
                break
        else:
            return b""
        if self._reader is None or self._reader_offset != offset:
            if self._reader is not None:
                self._reader.close()
            try:
                self._reader = ObjectReader(self.driver, self.driver.piece_path(self.path, offset))
            except FileNotFoundError:
                # Deleted under us (committed or discarded): the caller follows the blob.
                self._reader = None
                return b""
            self._reader_offset = offset
        return self._reader.read_at(pos - offset, min(length, offset + size - pos))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
