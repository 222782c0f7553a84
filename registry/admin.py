"""Admin commands behind `python -m registry`: list, warm, evict, verify, rebuild the Redis
indexes, show upstream quota, collect garbage. They work on the same store and Redis as the
running cache (single-flight included), so they are safe to run beside it."""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Iterator
from typing import TextIO

from redis.exceptions import RedisError

from registry.digests import Digest, looks_like_digest
from registry.gc import Collector
from registry.inventory import tag_rows
from registry.mediatypes import MANIFEST_TYPES
from registry.names import Target, resolve
from registry.progress import Progress
from registry.pullthrough.answers import Manifest
from registry.pullthrough.manifests import walk
from registry.pullthrough.service import PullThrough

ACCEPT = list(MANIFEST_TYPES)


def split_reference(ref: str) -> tuple[str, str]:
    """`name[:tag|@digest]` as (name, reference); the tag defaults to `latest`."""
    if "@" in ref:
        name, _, digest = ref.partition("@")
        return name, digest
    name, colon, tag = ref.rpartition(":")
    if colon and "/" not in tag:
        return name, tag
    return ref, "latest"


def tagged(pt: PullThrough, ref: str, action: str) -> tuple[str, str, Target]:
    """`name[:tag]` for an action that takes a tag: (name, tag, its Target)."""
    name, tag = split_reference(ref)
    if looks_like_digest(tag):
        raise ValueError(f"{action} takes a tag, not a digest")
    return name, tag, resolve(pt.settings, name, None)


def images(pt: PullThrough) -> Iterator[dict]:
    for name in pt._catalog_names():
        target = resolve(pt.settings, name, None)
        for row in tag_rows(pt, target):
            yield {"image": f"{name}:{row.tag}", "row": row}


def warm(pt: PullThrough, refs: list[str], out: TextIO = sys.stderr) -> int:
    """Fetch images (every platform of an index) into the cache; 0 when all arrived."""
    failed = 0
    for ref in refs:
        name, reference = split_reference(ref)
        try:
            target = resolve(pt.settings, name, None)
            top = pt.manifest(target, reference, ACCEPT)

            def load(digest: Digest, target: Target = target, top: Manifest = top) -> bytes:
                # The index's children come through the cache like any pull (fetched now).
                if digest == top.digest:
                    return top.body
                return pt.manifest(target, str(digest), ACCEPT).body

            blobs = [d for node in walk(top.digest, load) for d in node.blobs]
            progress = Progress(out)
            fetched = sum(_fetch_blob(pt, target, d, progress) for d in dict.fromkeys(blobs))
            progress.close()
            print(f"{ref}: {len(dict.fromkeys(blobs))} blobs, {fetched} bytes fetched", file=out)
        except Exception as exc:  # one bad reference does not stop the others
            failed += 1
            print(f"{ref}: failed: {getattr(exc, 'message', exc)}", file=out)
    return 1 if failed else 0


def _fetch_blob(pt: PullThrough, target: Target, digest: Digest, progress: Progress) -> int:
    """Fetch one blob, drawing progress; its size when it was not cached before, else 0."""
    label = target.repository
    got = pt.prefetch_blob(target, digest, lambda done, size: progress(label, digest, done, size))
    return got.size if got.miss else 0


def follow(pt: PullThrough, now: bool, out: TextIO = sys.stderr) -> int:
    """One tick of the follower here (every followed tag with `now`), with progress."""
    from registry.pullthrough.follower import Follower

    if not pt.settings.follow.enabled:
        print("nothing is followed: configure follow.images or follow.pulled_within", file=out)
        return 1
    progress = Progress(out)
    follower = Follower(pt, pt.coord.follows, pt.settings.follow, progress=progress)
    report = follower.tick(force=now)
    progress.close()
    for record in pt.coord.follows.read(pt.coord.follows.followed()):
        line = f"{record.member}: {record.state} {record.digest[:19]}"
        print(line + (f" ({record.message})" if record.message else ""), file=out)
    states = ", ".join(f"{n} {s}" for s, n in sorted(report.states.items())) or "none due"
    print(
        f"{report.followed} followed, {report.checked} checked ({states}), "
        f"{report.fetched_bytes} bytes fetched",
        file=out,
    )
    return 1 if report.states.get("failed") else 0


def evict(pt: PullThrough, ref: str) -> str:
    """Drop a tag and, when no other tag of its repository uses it, its manifest; the blobs
    only it used are freed by the next GC run (after gc.delay)."""
    name, tag, target = tagged(pt, ref, "evict")
    record = pt.store.read_tag(target, tag)
    if record is None:
        raise LookupError(f"{name}:{tag} is not cached")
    repo = str(target)
    pt.store.delete_tag(repo, tag)
    pt.store.unpin(repo, tag)
    others = [
        t
        for t in pt.store.list_tags(target)
        if (r := pt.store.read_tag(target, t)) and r.digest == record.digest
    ]
    if not others:
        pt.store.delete_revision(repo, record.digest)
    pt.store.prune_repository(repo)
    try:
        pt.coord.deletions.happened()  # no process reuses what it knew of this revision
        pt.coord.tag_moves.happened()  # nor the tag's record
        pt.coord.pulls.forget([f"{repo}:{tag}"])
        if not pt.store.has_manifests(repo):
            pt.coord.catalog.remove([pt.catalog_name(repo)])
    except RedisError:
        pass
    return str(record.digest)


def evict_repository(pt: PullThrough, name: str) -> list[str]:
    """Every cached tag of a repository evicted; the tags, as `name:tag`."""
    target = resolve(pt.settings, name, None)
    evicted = []
    for tag in pt.store.list_tags(target):
        ref = f"{name}:{tag}"
        with contextlib.suppress(LookupError):  # gone meanwhile
            evict(pt, ref)
            evicted.append(ref)
    if not evicted:
        raise LookupError(f"{name} has no cached tags")
    return evicted


def refresh(pt: PullThrough, ref: str) -> str:
    """The tag fetched from upstream now, whatever its tag_ttl says; its digest."""
    _, tag, target = tagged(pt, ref, "refresh")
    return str(pt.fetch_tag(target, tag).digest)


def pin(pt: PullThrough, ref: str, pinned: bool) -> None:
    """Keep a cached tag whatever the GC's retention says (or let it go again)."""
    name, tag, target = tagged(pt, ref, "pin")
    if pinned:
        if pt.store.read_tag(target, tag) is None:
            raise LookupError(f"{name}:{tag} is not cached")
        pt.store.pin(str(target), tag)
    elif not pt.store.unpin(str(target), tag):
        raise LookupError(f"{name}:{tag} is not pinned")


def verify(pt: PullThrough, delete: bool, out: TextIO = sys.stdout) -> int:
    """Re-hash every stored blob; report (and with `delete`, remove) the corrupt ones."""
    checked = corrupt = 0
    for digest, _size, _mtime in pt.store.iter_blobs():
        hasher = hashlib.new(digest.algorithm)
        try:
            with pt.store.open_blob(digest) as handle:
                while chunk := handle.read(1 << 20):
                    hasher.update(chunk)
        except FileNotFoundError:
            continue  # a sweep deleted it since the listing: nothing to check
        checked += 1
        if hasher.hexdigest() == digest.hex:
            continue
        corrupt += 1
        action = "found"
        if delete:
            lease = pt.coord.leases.blob(digest)
            if lease.acquire():
                try:
                    pt.store.delete_blob(digest)
                    pt.coord.deletions.happened()
                    pt.coord.tiers.deleted([str(digest)])
                    action = "removed (the next pull fetches it again)"
                finally:
                    lease.release()
            else:
                action = "in use by a fill; not removed"
        print(f"corrupt {digest}: {action}", file=out)
    print(f"verified {checked} blobs, {corrupt} corrupt", file=out)
    return 1 if corrupt else 0


def rebuild_index(pt: PullThrough) -> dict:
    """Rebuild the catalog and the storage totals in Redis from disk."""
    pt.coord.catalog.forget()
    names, _ = pt.catalog(None, None)
    total = blobs = 0
    for _digest, size, _mtime in pt.store.iter_blobs():
        total += size
        blobs += 1
    pt.coord.store.set(total, blobs)
    return {"repositories": len(names), "blobs": blobs, "bytes": total}


def ratelimit(pt: PullThrough) -> list[dict]:
    out = []
    for registry in pt.settings.registries:
        status = pt.coord.upstream_status(registry.name)
        out.append(
            {
                "registry": registry.name,
                "limit": status.get("limit"),
                "remaining": status.get("remaining"),
                "window_seconds": status.get("window"),
                "source": status.get("source"),
                "breaker": status["breaker"],
                "breaker_seconds_left": status["breaker_seconds"],
            }
        )
    return out


def collector(pt: PullThrough) -> Collector:
    """The GC of the cache's store and Redis that `pt` already has."""
    return Collector(pt.store, pt.coord, pt.settings.gc, catalog_name=pt.catalog_name)
