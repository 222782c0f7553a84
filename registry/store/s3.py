"""The S3 storage driver: the same layout as the filesystem, as object keys in one bucket.

Every path of store/paths.py is a key (under an optional prefix). What the filesystem does
with a file that grows and a rename, S3 does with pieces:

- A fill in progress is a row of **pieces**, `uploads/<algo>/<hex>/<offset>`: each one a plain
  object of `part_size` bytes (the last one shorter), PUT (its body's SHA-256 signed, which
  the store checks) as soon as the fill has that many bytes. Any process on any node follows
  a fill by reading the pieces that exist, so a client of another node gets bytes long
  before the fill completes, and a fill whose node died resumes from its last piece. Memory
  per fill is one piece (one per range of a parallel fill: a range ahead of the bytes in
  order writes its own pieces at its own offsets, which line up with the pieces' grid, and
  keeps a local spool of its bytes so that they are hashed in order without being read
  back; an `ExtentPieces`).
- The commit, once the digest matched, is one multipart upload of the blob's key whose parts
  are server-side copies of the pieces (UploadPartCopy): no byte crosses the network twice,
  and readers see the old key (nothing) or the whole blob. Then the pieces are deleted.
  S3 multipart parts cannot be read before the upload completes, which is why the pieces are
  objects of their own. The upload is begun as the fill goes (`PartCopies`): each piece is
  copied into its part once stored, so that after the last byte only the last piece is
  copied before the upload completes. A fill that ends otherwise aborts its upload; one
  whose process died leaves it to the GC (`abort_stale_multipart`), and whoever resumes the
  fill begins another.

Failures of the store reach the rest of the registry as `OSError(EIO, "<what> on S3 ...")`,
which it answers with a 503 naming the storage, as for a failing disk.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import errno
import hashlib
import io
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

from registry.config.settings import S3Settings, UpstreamSettings
from registry.store import paths

PIECE_DIGITS = 16  # piece keys sort by offset as strings
MAX_PARTS = 1000  # Swift's SLO limit (AWS allows 10000): large blobs get larger pieces
DELETE_BATCH = 1000


def s3_client(
    endpoint: str | None,
    access_key: str | None,
    secret_key: str | None,
    region: str,
    *,
    path_style: bool = S3Settings.path_style,
    verify: bool | str = S3Settings.tls_verify,
    connect_timeout: float = UpstreamSettings.connect_timeout,
    read_timeout: float = UpstreamSettings.read_timeout,
    pool: int = 64,
) -> Any:
    """A boto3 S3 client for S3-compatible stores, old ones included."""
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region,
        signature_version="s3v4",
        s3={"addressing_style": "path" if path_style else "auto"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=pool,
        # Newer botocore adds CRC checksums (and aws-chunked bodies) to every upload, which
        # many S3-compatible stores refuse: only where the API requires one.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
        verify=verify,
    )
    client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
    return client


def _add_content_md5(request: Any, **_: Any) -> None:
    # DeleteObjects must carry a checksum. botocore now sends a CRC32 only, and stores that
    # predate it (Swift 2.30's s3api, older Ceph and MinIO) insist on Content-MD5.
    body = request.body
    if isinstance(body, str):
        body = body.encode()
    if isinstance(body, bytes) and "Content-MD5" not in request.headers:
        request.headers["Content-MD5"] = _md5_b64(body)


def _md5_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _missing(exc: Exception) -> bool:
    return _status(exc) == 404 or _code(exc) in ("NoSuchKey", "404", "NotFound")


class S3Driver:
    """Objects in one bucket, keyed `<prefix><path>`."""

    # How often a follower looks for the next piece or the commit when it has nothing to send.
    poll_interval = 0.1
    lookups_are_requests = True

    # A parallel fill's ranges ahead of the bytes in order are pieces of the upload itself.
    supports_extents = True
    extents_in_place = True

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        prefix: str = S3Settings.prefix,
        part_size: int = S3Settings.part_size,
        endpoint: str | None = S3Settings.endpoint,
        commit_client: Any = None,
    ) -> None:
        self.client = client
        # A commit (a multipart copy of a whole blob) can take minutes on a busy store: its
        # calls go through a client with a longer read timeout.
        self.commit_client = commit_client or client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.part_size = part_size
        self.name = f"S3 bucket {bucket}" + (f" at {endpoint}" if endpoint else "")

    # -- plumbing --------------------------------------------------------------------------------
    def key(self, path: str) -> str:
        if "\x00" in path or path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"path escapes the storage root: {path!r}")
        return self.prefix + path

    def failure(self, what: str, path: str, exc: Exception) -> OSError:
        detail = _code(exc) or type(exc).__name__
        return OSError(errno.EIO, f"{what} {path} on {self.name} failed: {detail}")

    def _call(self, what: str, path: str, method: str, *, slow: bool = False, **kwargs: Any) -> Any:
        client = self.commit_client if slow else self.client
        try:
            return getattr(client, method)(Bucket=self.bucket, **kwargs)
        except Exception as exc:
            if _missing(exc):
                raise FileNotFoundError(errno.ENOENT, f"{path} is not on {self.name}") from None
            raise self.failure(what, path, exc) from None

    # -- whole objects ---------------------------------------------------------------------------
    def head(self, path: str) -> dict | None:
        try:
            return self._call("stat", path, "head_object", Key=self.key(path))
        except FileNotFoundError:
            return None

    def stat(self, path: str) -> int | None:
        info = self.head(path)
        return None if info is None else int(info["ContentLength"])

    def mtime(self, path: str) -> float | None:
        info = self.head(path)
        return None if info is None else info["LastModified"].timestamp()

    def open_read(self, path: str) -> BinaryIO:
        # A raw binary file (read, seek, close, a context manager): what callers use of one.
        return cast(BinaryIO, ObjectReader(self, path))

    def read(self, path: str) -> bytes | None:
        try:
            response = self._call("read", path, "get_object", Key=self.key(path))
        except FileNotFoundError:
            return None
        try:
            return response["Body"].read()
        except Exception as exc:
            raise self.failure("read", path, exc) from None

    def write_atomic(self, path: str, data: bytes) -> None:
        # A PUT is atomic on S3: readers see the old object or the new one. The store checks
        # the body against the SHA-256 that botocore signs (it signs the body of a PUT without
        # Content-MD5, over HTTPS too): a Content-MD5 as well hashed every piece twice.
        self._call("write", path, "put_object", Key=self.key(path), Body=data)

    def touch(self, path: str) -> None:
        if self.head(path) is None:
            self.write_atomic(path, b"")

    def delete(self, path: str) -> bool:
        # S3 answers a DELETE of nothing with success too: look first, for honest counts.
        if self.head(path) is None:
            return False
        self._call("delete", path, "delete_object", Key=self.key(path))
        return True

    def delete_many(self, paths: list[str]) -> None:
        for start in range(0, len(paths), DELETE_BATCH):
            batch = paths[start : start + DELETE_BATCH]
            result = self._call(
                "delete",
                f"{len(batch)} objects",
                "delete_objects",
                Delete={"Objects": [{"Key": self.key(p)} for p in batch], "Quiet": True},
            )
            errors = [e for e in result.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise OSError(errno.EIO, f"delete on {self.name} failed: {errors[0].get('Code')}")

    # -- listings --------------------------------------------------------------------------------
    def _pages(self, path: str, **options: Any) -> Iterator[tuple[str, dict]]:
        """(key prefix, page) of the listing of everything under `path`."""
        prefix = self.key(path.rstrip("/") + "/")
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, **options):
                yield prefix, page
        except Exception as exc:
            raise self.failure("list", path, exc) from None

    def _objects(self, path: str) -> Iterator[dict]:
        for _prefix, page in self._pages(path):
            yield from page.get("Contents", [])

    def list(self, path: str) -> list[str]:
        names: set[str] = set()
        for prefix, page in self._pages(path, Delimiter="/"):
            names.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
            names.update(
                p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            )
        return sorted(n for n in names if n)

    def walk_files(self, path: str) -> Iterator[str]:
        for item in self._objects(path):
            yield item["Key"][len(self.prefix) :]

    def walk_stat(self, path: str) -> Iterator[tuple[str, int, float]]:
        for item in self._objects(path):
            rel = item["Key"][len(self.prefix) :]
            yield rel, int(item["Size"]), item["LastModified"].timestamp()

    def prune(self, path: str, stop: str) -> None:
        """Nothing to do: S3 has no directories."""

    def prune_tree(self, path: str, stop: str) -> None:
        """Nothing to do: S3 has no directories."""

    # -- fills -----------------------------------------------------------------------------------
    def pieces(self, path: str) -> builtins.list[tuple[int, int, float]]:
        """(offset, size, mtime) of the pieces of the partial at `path`, by offset."""
        out = []
        for rel, size, mtime in self.walk_stat(path):
            name = rel.rsplit("/", 1)[-1]
            if name.isdigit():
                out.append((int(name), size, mtime))
        return sorted(out)

    def piece_path(self, path: str, offset: int) -> str:
        return f"{path}/{offset:0{PIECE_DIGITS}d}"

    def partial_size(self, path: str) -> int | None:
        """Bytes a fill can resume from: the run of whole pieces from offset 0."""
        pieces = self.pieces(path)
        return _leading_run(pieces) if pieces else None

    def list_partials(self, path: str) -> Iterator[tuple[str, float]]:
        """(partial path, newest piece's mtime) of every fill's pieces under `path`."""
        partials: dict[str, float] = {}
        for rel, _size, mtime in self.walk_stat(path):
            parent, _, name = rel.rpartition("/")
            key = parent if name.isdigit() and parent else rel
            partials[key] = max(partials.get(key, 0.0), mtime)
        yield from partials.items()

    def delete_partial(self, path: str) -> bool:
        paths = list(self.walk_files(path))
        if not paths and self.head(path) is not None:
            paths.append(path)  # a stray object where a partial's pieces would go
        if paths:
            self.delete_many(paths)
        return bool(paths)

    def open_partial(
        self, path: str, size: int | None = None, commit_to: str | None = None
    ) -> PieceWriter:
        return PieceWriter(self, path, self._piece_size(size), commit_to=commit_to)

    def extent_alignment(self, size: int) -> int:
        """Ranges of a parallel fill start on the pieces' grid: every piece but the blob's
        last is then whole (a multipart part may not be smaller than 5 MiB)."""
        return self._piece_size(size)

    def open_extent(
        self, path: str, offset: int, size: int | None = None, held: int = 0
    ) -> ExtentPieces:
        return ExtentPieces(self, path, offset, self._piece_size(size), stored=held)

    def extents(self, path: str) -> builtins.list[tuple[int, int]]:
        """(offset, size) of each run of pieces past the run from offset 0 (ranges an earlier
        parallel fill stored ahead of its bytes in order)."""
        pieces = self.pieces(path)  # one listing for both
        held = _leading_run(pieces)
        runs: builtins.list[builtins.list[int]] = []
        for offset, size, _mtime in pieces:
            if offset < held:
                continue
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1][1] += size
            else:
                runs.append([offset, size])
        return [(offset, size) for offset, size in runs]

    def _piece_size(self, size: int | None) -> int:
        if not size or size <= self.part_size * MAX_PARTS:
            return self.part_size
        mib = 1 << 20
        return math.ceil(size / MAX_PARTS / mib) * mib

    def open_partial_read(self, path: str) -> PieceReader | ObjectReader | None:
        if path.startswith(f"{paths.UPLOADS}/"):
            # No request: a follower of a fill whose first piece is not stored yet finds it
            # by polling (PieceReader.available).
            return PieceReader(self, path)
        try:
            return ObjectReader(self, path)
        except FileNotFoundError:
            return None

    def is_same_file(self, handle: Any, path: str) -> bool | None:
        if getattr(handle, "path", None) == path:
            return True
        if path.startswith(f"{paths.UPLOADS}/"):
            return False if self.pieces(path) else None
        return False if self.head(path) is not None else None

    def presign(self, path: str, expires: int) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(path)}, ExpiresIn=expires
        )

    def abort_stale_multipart(self, older_than: float) -> int:
        """Abort multipart uploads (commits of dead nodes) started more than `older_than`
        seconds ago; the bucket's lifecycle rule does the same where the store has one."""
        aborted = 0
        # Stores round timestamps up to the second (Swift does): allow for it.
        cutoff = time.time() - older_than + 1.0
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() <= cutoff:
                        with contextlib.suppress(Exception):
                            self.client.abort_multipart_upload(
                                Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                            )
                            aborted += 1
        except Exception as exc:
            raise self.failure("list uploads", "the bucket", exc) from None
        return aborted


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


def _leading_run(pieces: list[tuple[int, int, float]]) -> int:
    """Bytes of the run of whole pieces from offset 0 (`pieces` by offset)."""
    size = 0
    whole = pieces[0][1] if pieces else 0
    for offset, length, _mtime in pieces:
        if offset != size or length != whole:
            break  # a gap, or the short last piece (rewritten by whoever resumes)
        size += length
    return size


def _invalid_range(exc: OSError) -> bool:
    return "InvalidRange" in str(exc)


# The fills this process is writing, by (bucket, key): followers in the fetcher's own process
# (its first client, usually) read the bytes not yet stored as a piece from its memory.
_WRITING: dict[tuple[str, str], PieceWriter] = {}
# The commits this process is assembling as their fills go, by (bucket, key of the pieces):
# the pieces a parallel fill's ranges store join their fill's.
_ASSEMBLING: dict[tuple[str, str], PartCopies] = {}


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
        writer = _WRITING.get(self._local)
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
            writer = _WRITING.get(self._local)
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
            _WRITING[self._local] = self
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
        parts = self._parts if self._register else _ASSEMBLING.get(self._local)
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
        if _WRITING.get(self._local) is self:
            del _WRITING[self._local]
        with self._lock:
            self._buffer = bytearray()
        if self._parts is not None:  # the fill ends without this commit
            self._parts.cancel()
            self._parts = None

    def close(self) -> None:
        self._forget()
        if self._follower is not None:
            self._follower.close()


class PartCopies:
    """A fill's commit, assembled as the fill goes: the multipart upload of the blob's key,
    begun with the first piece stored, each piece copied (server-side) into its part on a
    thread of its own as soon as it is stored. The commit after the last byte then copies
    what is left (the last piece, and any a resumed fill found stored) and completes, where it
    copied every piece. A copy that fails early is made again by the commit."""

    def __init__(
        self, driver: S3Driver, path: str, dest: str, piece_size: int, register: bool = True
    ) -> None:
        self.driver = driver
        self.dest = dest
        self.piece_size = piece_size
        self._path = path
        self._key = driver.key(dest)
        self._local = (driver.bucket, driver.key(path))
        self._upload: str | None = None
        # part number -> (offset, size, ETag) of each piece copied early
        self._parts: dict[int, tuple[int, int, str]] = {}
        self._queue: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._ended = False  # no piece joins any more
        self._abandoned = False  # and the upload is aborted, not completed
        if register:
            _ASSEMBLING[self._local] = self

    def stored(self, offset: int, size: int) -> None:
        """The piece at `offset` is in the bucket: copy it into its part. Only pieces on
        this fill's grid (a resumed fill's may lie on another) whose part number is then
        known before the commit."""
        if offset % self.piece_size or size > self.piece_size:
            return
        with self._lock:
            if self._ended:
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._copy_stored, name="s3-part-copies", daemon=True
                )
                self._thread.start()
        self._queue.put((offset, size))

    def _copy_stored(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._abandoned:
                continue
            offset, size = item
            number = offset // self.piece_size + 1
            try:
                etag = self._copy(number, offset)
            except Exception:  # the store's failure, or an answer without an ETag
                continue  # the commit copies this one itself
            self._parts[number] = (offset, size, etag)
        if self._abandoned:
            self._abort()

    def _request(self, method: str, **kwargs: Any) -> Any:
        """One request of the commit on the blob's key (the slow client: copies take time)."""
        return self.driver._call("commit", self.dest, method, slow=True, Key=self._key, **kwargs)

    def _begin(self) -> str:
        if self._upload is None:
            self._upload = self._request("create_multipart_upload")["UploadId"]
        return self._upload

    def _copy(self, number: int, offset: int) -> str:
        piece = self.driver.key(self.driver.piece_path(self._path, offset))
        result = self._request(
            "upload_part_copy",
            UploadId=self._begin(),
            PartNumber=number,
            CopySource=f"{self.driver.bucket}/{piece}",
        )
        return result["CopyPartResult"]["ETag"]

    def _end(self) -> threading.Thread | None:
        """No more pieces: the copier stops after the one it is copying."""
        with self._lock:
            self._ended = True
            thread, self._thread = self._thread, None
        if _ASSEMBLING.get(self._local) is self:
            del _ASSEMBLING[self._local]
        if thread is not None:
            self._queue.put(None)
        return thread

    def cancel(self) -> None:
        """The fill ends without this commit: abort the upload (the copier does once it has
        stopped; nobody waits for it)."""
        self._abandoned = True
        if self._end() is None:
            self._abort()

    def _abort(self) -> None:
        upload, self._upload = self._upload, None
        if upload is None:
            return
        with contextlib.suppress(Exception):
            self.driver.client.abort_multipart_upload(
                Bucket=self.driver.bucket, Key=self._key, UploadId=upload
            )

    def complete(self, pieces: list[tuple[int, int]]) -> None:
        """The blob from `pieces` ((offset, size), whole and in order): each part copied
        early that holds the same piece, the others copied now. An upload that is gone (the
        GC aborts those it finds an hour old) is begun again."""
        thread = self._end()
        if thread is not None:
            thread.join()  # the piece it was copying
        try:
            try:
                self._complete(pieces)
            except FileNotFoundError:  # NoSuchUpload: aborted under a long fill
                self._upload, self._parts = None, {}
                self._complete(pieces)
        except BaseException:
            self._abort()
            raise

    def _complete(self, pieces: list[tuple[int, int]]) -> None:
        parts = []
        for number, (offset, size) in enumerate(pieces, start=1):
            early = self._parts.get(number)
            etag = early[2] if early and early[:2] == (offset, size) else self._copy(number, offset)
            parts.append({"PartNumber": number, "ETag": etag})
        self._request(
            "complete_multipart_upload",
            UploadId=self._begin(),
            MultipartUpload={"Parts": parts},
        )
        self._upload = None


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
