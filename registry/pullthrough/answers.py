"""What pull-through answers: a manifest, a blob ready to serve, a blob prefetched."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from registry.digests import Digest
from registry.store.driver import FileSpan


@dataclass(frozen=True, slots=True)
class Manifest:
    body: bytes
    digest: Digest
    media_type: str
    # hit: served from disk; miss: fetched; revalidated: upstream confirmed the cached tag;
    # stale: upstream failed and the cached tag was served anyway.
    cache: str


@dataclass
class Blob:
    """A blob ready to serve: either a committed file or a fill in progress."""

    digest: Digest
    size: int
    cache: str  # "hit" or "miss"
    open_file: Callable[[], BinaryIO] | None = None
    stream: Callable[[int, int], Iterator[bytes]] | None = None
    # The stream with a local file's bytes as FileSpans (for a sender with sendfile).
    spans: Callable[[int, int], Iterator[bytes | FileSpan]] | None = None
    redirect: str | None = None  # a presigned URL of the store that serves the bytes
    joined: bool = False  # a miss that streams another request's fill

    def read_all(self, limit: int) -> bytes | None:
        """The whole blob, read here (at most `limit` + 1 bytes of a file); None where only
        the store's URL serves it (a redirect)."""
        if self.stream is not None:
            return b"".join(self.stream(0, self.size - 1))
        if self.open_file is not None:
            with self.open_file() as handle:
                return handle.read(limit + 1)
        return None

    def drain(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Read a fill (or a node's copy) to its verified end, reporting (done, size); let an
        open file go."""
        if self.stream is None:
            if self.open_file is not None:
                self.open_file().close()
            return
        done = 0
        for chunk in self.stream(0, self.size - 1):
            done += len(chunk)
            if progress is not None:
                progress(done, self.size)


@dataclass(frozen=True, slots=True)
class Prefetched:
    """A blob brought into the cache with nobody to send it to (warm, the follower)."""

    size: int
    miss: bool  # it was not cached before this call
    joined: bool  # a fill someone else started brought it


def _replace_cache(manifest: Manifest, cache: str) -> Manifest:
    return Manifest(manifest.body, manifest.digest, manifest.media_type, cache)
