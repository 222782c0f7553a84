"""Every path of the store, built here and nowhere else (as distribution's paths.go).

Disk layout (the one place it is written down; `<root>` is `storage.root`):

    <root>/blobs/<algo>/<hex[:2]>/<hex>
        Verified content, addressed by digest: layers, configs and manifests alike (manifests
        byte-exact as upstream served them). One copy however many repositories use it.
        A file appears here only by an atomic rename after its digest and size matched.
    <root>/uploads/<algo>/<hex>
        The fill in progress for that digest. Followers read it as it grows; it is never
        served as complete. Left-overs with no live lease are removed at start-up.
        A parallel fill (upstream.parallel_ranges) writes ranges that arrive before the bytes
        in front of them here too, at their offsets; while it has bytes past a gap the file
        carries the user attributes `user.pullthrough.prefix` (its bytes in order: what
        followers read) and `user.pullthrough.extents` (JSON [[start, end], ...] written past
        them: what a takeover does not fetch again), removed once it is whole (store/
        filesystem.py). On S3 this is a prefix: the fill's pieces,
        `uploads/<algo>/<hex>/<offset>` (16 digits), each `storage.s3.part_size` bytes but
        the last (store/s3/).
    <root>/uploads/<algo>/<hex>.<offset>
        Only on a filesystem without user attributes: a range of a parallel fill that arrived
        before the bytes in front of it, its bytes from <offset> (16 digits) on, moved into
        the fill above (and deleted) once that reaches them.
    <root>/repositories/<registry>/<repository>/_manifests/revisions/<algo>/<hex>
        This repository has this manifest; the file holds the media type upstream served.
    <root>/repositories/<registry>/<repository>/_manifests/tags/<tag>
        JSON `{"digest": "...", "mediaType": "...", "validated": <unix time>}`: the tag's
        manifest as of the last time upstream was asked.
    <root>/repositories/<registry>/<repository>/_referrers/<algo>/<hex>
        JSON as a tag's: `digest` names the cached referrers list of that manifest (an OCI
        image index, stored as a blob), `validated` when upstream was last asked for it.
    <root>/repositories/<registry>/<repository>/_layers/<algo>/<hex>
        Empty: this repository may be served this blob (upstream served it for this
        repository, or confirmed with a HEAD that the repository has it). Cached blobs are
        served only through such a link (or a manifest revision of the repository), so one
        repository's private content never leaks to another.
    <root>/repositories/<registry>/<repository>/_pins/<tag>
        Empty: an admin pinned this tag (the UI or POST /admin/pin): the GC keeps it and
        what it needs, as it does a tag matching a `gc.pins` glob.
    <root>/tmp/
        Temporaries of atomic writes.

With `storage.driver: s3` every path above is an object key in the bucket, under
`storage.s3.prefix`; there are no directories.

`<registry>` is a configured registry name (`docker.io`), `<repository>` a validated name
(`library/alpine`), `<tag>` a validated tag: the grammar admits no `..` and a tag no `/`, so
these are always paths under the root. The functions below check them (NameInvalid,
TagInvalid), whoever calls them with whatever came from where.
Everything in Redis can be rebuilt from this tree.
"""

from __future__ import annotations

from registry.digests import Digest
from registry.names import Tag, stored_repository

BLOBS = "blobs"
UPLOADS = "uploads"
REPOSITORIES = "repositories"
TMP = "tmp"
EXTENT_DIGITS = 16

# What follows `repositories/<registry>/<repository>` in each kind of repository file.
REVISIONS_MARK = "/_manifests/revisions/"
TAGS_MARK = "/_manifests/tags/"
LINKS_MARK = "/_layers/"
REFERRERS_MARK = "/_referrers/"
PINS_MARK = "/_pins/"


def _by_digest(digest: Digest) -> str:
    return f"{digest.algorithm}/{digest.hex}"


def blob(digest: Digest) -> str:
    return f"{BLOBS}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def upload(digest: Digest) -> str:
    return f"{UPLOADS}/{_by_digest(digest)}"


def extent(upload_path: str, offset: int) -> str:
    """The range of a fill (at `upload_path`) that starts at `offset`."""
    return f"{upload_path}.{offset:0{EXTENT_DIGITS}d}"


def extent_offset(path: str) -> tuple[str, int] | None:
    """(upload path, offset) of an extent's path; None for anything else."""
    base, dot, suffix = path.rpartition(".")
    if not dot or len(suffix) != EXTENT_DIGITS or not suffix.isdigit():
        return None
    return base, int(suffix)


def repository(repo: str) -> str:
    """`repo` as stored: `<registry>/<repository>`."""
    return f"{REPOSITORIES}/{stored_repository(repo)}"


def link(repo: str, digest: Digest) -> str:
    return f"{REPOSITORIES}/{stored_repository(repo)}{LINKS_MARK}{_by_digest(digest)}"


def revisions(repo: str) -> str:
    return f"{REPOSITORIES}/{stored_repository(repo)}{REVISIONS_MARK}".rstrip("/")


def revision(repo: str, digest: Digest) -> str:
    return f"{REPOSITORIES}/{stored_repository(repo)}{REVISIONS_MARK}{_by_digest(digest)}"


def tags(repo: str) -> str:
    return f"{REPOSITORIES}/{stored_repository(repo)}{TAGS_MARK}".rstrip("/")


def tag(repo: str, name: str) -> str:
    return f"{REPOSITORIES}/{stored_repository(repo)}{TAGS_MARK}{Tag(name)}"


def pin(repo: str, name: str) -> str:
    return f"{REPOSITORIES}/{stored_repository(repo)}{PINS_MARK}{Tag(name)}"


def pins(repo: str) -> str:
    return f"{REPOSITORIES}/{stored_repository(repo)}{PINS_MARK}".rstrip("/")


def referrers(repo: str, subject: Digest) -> str:
    return f"{REPOSITORIES}/{stored_repository(repo)}{REFERRERS_MARK}{_by_digest(subject)}"


def temporary(name: str) -> str:
    return f"{TMP}/{name}"
