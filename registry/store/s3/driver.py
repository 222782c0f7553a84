"""S3Driver: the storage driver on one bucket (the layout as object keys; a fill as pieces,
written by writers.py, followed by readers.py, committed through copies.py)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from registry.config.settings import S3Settings
from registry.store import paths
from registry.store.s3.client import code_of, is_missing
from registry.store.s3.readers import ObjectReader, PieceReader
from registry.store.s3.writers import ExtentPieces, PieceWriter

if TYPE_CHECKING:
    from registry.store.s3.copies import PartCopies

PIECE_DIGITS = 16  # piece keys sort by offset as strings
MAX_PARTS = 1000  # Swift's SLO limit (AWS allows 10000): large blobs get larger pieces
DELETE_BATCH = 1000


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
        # The fills this driver is writing, by (bucket, key of the pieces): followers in the
        # fetcher's own process read the bytes not yet stored as a piece from its memory.
        self.writing: dict[tuple[str, str], PieceWriter] = {}
        # The commits it is assembling as their fills go: the pieces a parallel fill's
        # ranges store join their fill's.
        self.assembling: dict[tuple[str, str], PartCopies] = {}
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
        detail = code_of(exc) or type(exc).__name__
        return OSError(errno.EIO, f"{what} {path} on {self.name} failed: {detail}")

    def _call(self, what: str, path: str, method: str, *, slow: bool = False, **kwargs: Any) -> Any:
        client = self.commit_client if slow else self.client
        try:
            return getattr(client, method)(Bucket=self.bucket, **kwargs)
        except Exception as exc:
            if is_missing(exc):
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

    def version(self, path: str) -> None:
        """A HEAD would cost a request, as the read does: callers read instead."""
        return None

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
        return leading_run(pieces) if pieces else None

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
        held = leading_run(pieces)
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


def leading_run(pieces: list[tuple[int, int, float]]) -> int:
    """Bytes of the run of whole pieces from offset 0 (`pieces` by offset)."""
    size = 0
    whole = pieces[0][1] if pieces else 0
    for offset, length, _mtime in pieces:
        if offset != size or length != whole:
            break  # a gap, or the short last piece (rewritten by whoever resumes)
        size += length
    return size
