"""ContentStore: the registry's view of the storage driver (layout documented in __init__)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from registry.digests import Digest
from registry.errors import RegistryError
from registry.names import Tag, Target, is_tag
from registry.store import paths
from registry.store.driver import ExtentWriter, GrowingReader, PartialWriter, StorageDriver


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: Digest
    media_type: str
    validated: float

    def to_json(self, of: str) -> bytes:
        """`of` names what the record is of (`<registry>/<repository>:<tag>`): a record read
        under any other name is not served."""
        return json.dumps(
            {
                "digest": str(self.digest),
                "mediaType": self.media_type,
                "validated": self.validated,
                "of": of,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, of: str) -> TagRecord | None:
        try:
            raw = json.loads(data)
            if raw.get("of", of) != of:
                return None  # written for another repository or tag
            return cls(Digest.parse(raw["digest"]), str(raw["mediaType"]), float(raw["validated"]))
        except (ValueError, KeyError, TypeError, AttributeError, RegistryError):
            return None  # a torn or foreign file is treated as absent, never as a crash


@dataclass
class RepositoryScan:
    """What one repository holds on disk, with each file's mtime (for the GC)."""

    revisions: dict[Digest, float]
    tags: dict[str, float]
    links: dict[Digest, float]
    referrers: dict[Digest, float] = field(default_factory=dict)  # by subject
    pins: set[str] = field(default_factory=set)  # tags an admin pinned


def _parse_digest(algorithm: str, hexpart: str) -> Digest | None:
    try:
        return Digest.parse(f"{algorithm}:{hexpart}")
    except RegistryError:
        return None


# Manifest bodies kept per process, verified once (a few KiB each; 8 MiB holds thousands).
MANIFEST_MEMO_BYTES = 8 << 20
# Revision media types and tag records kept per process (each forgotten all at once past
# this many).
MEDIA_TYPE_MEMO = 50_000


class ContentStore:
    def __init__(self, driver: StorageDriver) -> None:
        self.driver = driver
        self._manifests: OrderedDict[Digest, bytes] = OrderedDict()
        self._manifest_bytes = 0
        self._media_types: dict[str, str] = {}
        # A tag file's record, with the file's version it was read from.
        self._tags: dict[str, tuple[Hashable, TagRecord | None]] = {}

    # -- what the store is like (its driver's answers; nobody else reads the driver) -----------
    @property
    def lookups_are_requests(self) -> bool:
        """A stat costs a network request (S3): followers ask Redis first, answers are
        reused, and reads are counted."""
        return self.driver.lookups_are_requests

    @property
    def poll_interval(self) -> float:
        """How often a follower with nothing to send looks again, at most."""
        return self.driver.poll_interval

    @property
    def supports_extents(self) -> bool:
        """A fill may store ranges ahead of its bytes in order (a parallel fill)."""
        return self.driver.supports_extents

    @property
    def extents_in_place(self) -> bool:
        """Those ranges are part of the upload where they lie, not side files to copy in."""
        return self.driver.extents_in_place

    def extent_alignment(self, size: int) -> int:
        """Where the ranges of a parallel fill of `size` bytes may start: multiples of this."""
        return self.driver.extent_alignment(size)

    def probe_writable(self, name: str) -> None:
        """Write and delete a small temporary (readiness); OSError when the store cannot."""
        probe = paths.temporary(name)
        self.driver.write_atomic(probe, b"ok")
        self.driver.delete(probe)

    def abort_stale_commits(self, older_than: float) -> int:
        """Abort the store's unfinished commits older than this (S3's multipart uploads)."""
        return self.driver.abort_stale_multipart(older_than)

    # -- blobs -----------------------------------------------------------------------------
    @staticmethod
    def blob_path(digest: Digest) -> str:
        return paths.blob(digest)

    @staticmethod
    def upload_path(digest: Digest) -> str:
        return paths.upload(digest)

    def blob_size(self, digest: Digest) -> int | None:
        return self.driver.stat(self.blob_path(digest))

    def open_blob(self, digest: Digest) -> BinaryIO:
        return self.driver.open_read(self.blob_path(digest))

    def read_blob(self, digest: Digest) -> bytes | None:
        return self.driver.read(self.blob_path(digest))

    def read_manifest(self, digest: Digest) -> bytes | None:
        """A manifest's bytes, only if they match `digest` (a damaged file reads as absent, so
        the caller fetches it again). Verified bodies are remembered: content-addressed bytes
        never change, and whether this repository or tag may see them is still decided on
        disk by the caller."""
        body = self._manifests.get(digest)
        if body is not None:
            self._manifests.move_to_end(digest)
            return body
        body = self.read_blob(digest)
        if body is None or not digest.matches(body):
            return None
        self._manifests[digest] = body
        self._manifest_bytes += len(body)
        while self._manifest_bytes > MANIFEST_MEMO_BYTES:
            self._manifest_bytes -= len(self._manifests.popitem(last=False)[1])
        return body

    def put_verified_bytes(self, digest: Digest, data: bytes) -> bool:
        """Store small content (manifests) whose digest the caller has checked; True when it
        was not there yet (or was damaged: same size, other bytes)."""
        if self.driver.read(self.blob_path(digest)) != data:
            self.driver.write_atomic(self.blob_path(digest), data)
            return True
        return False

    def upload_size(self, digest: Digest) -> int | None:
        return self.driver.partial_size(self.upload_path(digest))

    def open_upload(self, digest: Digest, size: int | None = None) -> PartialWriter:
        return self.driver.open_partial(
            self.upload_path(digest), size, commit_to=self.blob_path(digest)
        )

    def open_upload_extent(
        self, digest: Digest, offset: int, size: int | None = None, held: int = 0
    ) -> ExtentWriter:
        return self.driver.open_extent(self.upload_path(digest), offset, size, held)

    def upload_extents(self, digest: Digest) -> list[tuple[int, int]]:
        if not self.driver.supports_extents:
            return []
        return self.driver.extents(self.upload_path(digest))

    def presign_blob(self, digest: Digest, expires: int) -> str | None:
        return self.driver.presign(self.blob_path(digest), expires)

    def follow(
        self, digest: Digest, handle: GrowingReader | None, *, in_flight: bool = False
    ) -> GrowingReader | None:
        """The open file that holds the digest's bytes now: `handle` itself, or a newly
        opened one after a commit (the blob) or a restarted fill (a new upload file).
        `in_flight`: a fill's record says it has not committed, so its upload is followed
        without looking for the blob first (on S3 a GET that could only say 404); a commit
        since then is found as the upload's pieces go."""
        where = (self.blob_path(digest), self.upload_path(digest))
        for path in where[1:] if in_flight else where:
            if handle is not None:
                same = self.driver.is_same_file(handle, path)
                if same:
                    return handle
                if same is None:
                    continue
            opened = self.driver.open_partial_read(path)
            if opened is None:
                continue
            if handle is not None:
                handle.close()
            return opened
        return handle

    def commit_upload(self, upload: PartialWriter, digest: Digest) -> None:
        upload.commit(self.blob_path(digest))

    def clean_uploads(self, in_use: Callable[[Digest], bool], min_age: float) -> list[str]:
        """Remove partial files that no live fill owns (start-up clean-up)."""
        removed = []
        now = time.time()
        for path, mtime in list(self.driver.list_partials(paths.UPLOADS)):
            parts = path.split("/")
            if len(parts) != 3:
                continue
            try:
                digest = Digest.parse(f"{parts[1]}:{parts[2]}")
            except Exception:
                self.driver.delete_partial(path)
                removed.append(path)
                continue
            if now - mtime < min_age:
                continue
            if not in_use(digest) and self.driver.delete_partial(path):
                removed.append(path)
        return removed

    # -- repositories ------------------------------------------------------------------------
    def link_blob(self, target: Target, digest: Digest) -> None:
        self.driver.touch(paths.link(str(target), digest))

    def is_linked(self, target: Target, digest: Digest) -> bool:
        repo = str(target)
        return (
            self.driver.stat(paths.link(repo, digest)) is not None
            or self.driver.stat(paths.revision(repo, digest)) is not None
        )

    def put_manifest_revision(self, target: Target, digest: Digest, media_type: str) -> None:
        path = paths.revision(str(target), digest)
        if self.driver.read(path) != media_type.encode():
            self.driver.write_atomic(path, media_type.encode())
        self._media_types.pop(path, None)

    def manifest_media_type(self, target: Target, digest: Digest) -> str | None:
        """The media type of this repository's revision, None when it has none. What the file
        says is remembered; whether it still exists (GC, evict) is asked of the disk each time,
        with a stat instead of a read: this is on every request by digest."""
        path = paths.revision(str(target), digest)
        known = self._media_types.get(path)
        if known is not None:
            if self.driver.stat(path) is not None:
                return known
            del self._media_types[path]
            return None
        data = self.driver.read(path)
        if data is None:
            return None
        if len(self._media_types) >= MEDIA_TYPE_MEMO:
            self._media_types.clear()
        self._media_types[path] = media_type = data.decode()
        return media_type

    def read_tag(self, target: Target, tag: str) -> TagRecord | None:
        return self.read_tag_of(str(target), tag)

    def write_tag(self, target: Target, tag: str, record: TagRecord) -> None:
        repo = str(target)
        self.driver.write_atomic(paths.tag(repo, tag), record.to_json(f"{repo}:{tag}"))

    def list_tags(self, target: Target) -> list[Tag]:
        return [Tag(name) for name in self.driver.list(paths.tags(str(target))) if is_tag(name)]

    def read_referrers(self, target: Target, subject: Digest) -> TagRecord | None:
        return self.read_referrers_of(str(target), subject)

    def read_referrers_of(self, repo: str, subject: Digest) -> TagRecord | None:
        data = self.driver.read(paths.referrers(repo, subject))
        return TagRecord.from_json(data, f"{repo}@{subject}") if data is not None else None

    def write_referrers(self, target: Target, subject: Digest, record: TagRecord) -> None:
        repo = str(target)
        self.driver.write_atomic(
            paths.referrers(repo, subject), record.to_json(f"{repo}@{subject}")
        )

    # -- what the GC needs ------------------------------------------------------------------------
    def iter_blobs(self) -> Iterator[tuple[Digest, int, float]]:
        """(digest, size, mtime) of every committed blob."""
        for path, size, mtime in self.driver.walk_stat(paths.BLOBS):
            parts = path.split("/")
            if len(parts) == 4:
                digest = _parse_digest(parts[1], parts[3])
                if digest is not None:
                    yield digest, size, mtime

    def iter_uploads(self) -> Iterator[tuple[str, Digest | None, float]]:
        """(path, digest or None for a stray file, mtime) of every partial file."""
        for path, mtime in self.driver.list_partials(paths.UPLOADS):
            parts = path.split("/")
            digest = _parse_digest(parts[1], parts[2]) if len(parts) == 3 else None
            yield path, digest, mtime

    def scan_repositories(self) -> dict[str, RepositoryScan]:
        """Every repository (`<registry>/<repository>`) with its revisions, tags and links."""
        repos: dict[str, RepositoryScan] = {}
        for path, _size, mtime in self.driver.walk_stat(paths.REPOSITORIES):
            for marker, kind in (
                (paths.REVISIONS_MARK, "revisions"),
                (paths.TAGS_MARK, "tags"),
                (paths.LINKS_MARK, "links"),
                (paths.REFERRERS_MARK, "referrers"),
                (paths.PINS_MARK, "pins"),
            ):
                at = path.find(marker)
                if at < 0:
                    continue
                repo = path[len(paths.REPOSITORIES) + 1 : at]
                scan = repos.setdefault(repo, RepositoryScan({}, {}, {}))
                rest = path[at + len(marker) :]
                if kind == "tags":
                    if is_tag(rest):  # nothing else can be a tag's file
                        scan.tags[rest] = mtime
                elif kind == "pins":
                    if is_tag(rest):
                        scan.pins.add(rest)
                else:
                    algorithm, _, hexpart = rest.partition("/")
                    digest = _parse_digest(algorithm, hexpart)
                    if digest is not None:
                        getattr(scan, kind)[digest] = mtime
                break
        return repos

    def read_tag_of(self, repo: str, tag: str) -> TagRecord | None:
        """The tag's record. Read on every request for the tag: what the file says is
        remembered while its version (a stat, where the driver has one) is unchanged, so a
        tag another process or node moved or evicted is seen at once."""
        path = paths.tag(repo, tag)
        version = self.driver.version(path)
        if version is not None:
            known = self._tags.get(path)
            if known is not None and known[0] == version:
                return known[1]
        data = self.driver.read(path)
        record = TagRecord.from_json(data, f"{repo}:{tag}") if data is not None else None
        if version is not None:
            if len(self._tags) >= MEDIA_TYPE_MEMO:
                self._tags.clear()
            self._tags[path] = (version, record)
        return record

    def delete_blob(self, digest: Digest) -> bool:
        path = self.blob_path(digest)
        deleted = self.driver.delete(path)
        self.driver.prune(path.rsplit("/", 1)[0], paths.BLOBS)
        return deleted

    def delete_upload(self, path: str) -> bool:
        return self.driver.delete_partial(path)

    def delete_tag(self, repo: str, tag: str) -> bool:
        return self.driver.delete(paths.tag(repo, tag))

    def pin(self, repo: str, tag: str) -> None:
        self.driver.write_atomic(paths.pin(repo, tag), b"")

    def unpin(self, repo: str, tag: str) -> bool:
        return self.driver.delete(paths.pin(repo, tag))

    def pinned_tags(self, repo: str) -> set[str]:
        return {name for name in self.driver.list(paths.pins(repo)) if is_tag(name)}

    def delete_revision(self, repo: str, digest: Digest) -> bool:
        return self.driver.delete(paths.revision(repo, digest))

    def delete_link(self, repo: str, digest: Digest) -> bool:
        return self.driver.delete(paths.link(repo, digest))

    def delete_referrers(self, repo: str, subject: Digest) -> bool:
        return self.driver.delete(paths.referrers(repo, subject))

    def has_manifests(self, repo: str) -> bool:
        return next(self.driver.walk_files(paths.revisions(repo)), None) is not None

    def prune_repository(self, repo: str) -> None:
        """Remove the repository's directories that are now empty."""
        self.driver.prune_tree(paths.repository(repo), paths.REPOSITORIES)

    def iter_repositories(self) -> Iterator[str]:
        """Yield `<registry>/<repository>` for every repository with a cached manifest."""
        for path in self.driver.walk_files(paths.REPOSITORIES):
            if paths.REVISIONS_MARK in path:
                yield path[len(paths.REPOSITORIES) + 1 : path.index(paths.REVISIONS_MARK)]
