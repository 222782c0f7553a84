"""The commit of a fill on S3: one multipart upload of the blob's key whose parts are
server-side copies of its pieces, begun as the fill goes (PartCopies)."""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.store.s3.driver import S3Driver


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
            self.driver.assembling[self._local] = self

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
        if self.driver.assembling.get(self._local) is self:
            del self.driver.assembling[self._local]
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
