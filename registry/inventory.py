"""What the cache holds, for people: a repository's tags with digest, platforms, size, last
pull and pull count. Read by the web UI and the admin CLI."""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from registry.digests import Digest
from registry.errors import RegistryError
from registry.names import Target
from registry.pullthrough import PullThrough
from registry.pullthrough.manifests import walk


@dataclass
class TagRow:
    tag: str
    digest: str
    media_type: str
    platforms: list[str]
    size: int | None
    partial: str
    last_pulled: float | None
    pulls: int
    state: str


def tag_rows(pt: PullThrough, target: Target) -> list[TagRow]:
    tags = pt.store.list_tags(target)
    members = [f"{target}:{tag}" for tag in tags]
    try:
        pulled, counts = pt.coord.pulls.history(members)
    except RedisError:
        pulled, counts = [None] * len(tags), [0] * len(tags)
    rows = []
    now = time.time()
    for tag, last, count in zip(tags, pulled, counts, strict=True):
        record = pt.store.read_tag(target, tag)
        if record is None:
            continue
        platforms, size, partial = describe(pt, str(record.digest))
        ttl = target.registry.ttl_of(target.repository, tag)
        state = "fresh" if now - record.validated < ttl else "revalidates on next pull"
        rows.append(
            TagRow(
                tag=tag,
                digest=str(record.digest),
                media_type=record.media_type,
                platforms=platforms,
                size=size,
                partial=partial,
                last_pulled=last,
                pulls=count,
                state=state,
            )
        )
    return rows


def describe(pt: PullThrough, digest: str) -> tuple[list[str], int | None, str]:
    """Platforms, total size (config + layers) and a note on children not cached yet."""
    try:
        root = Digest.parse(digest)
    except RegistryError:
        return [], None, ""

    def load(digest: Digest) -> bytes | None:
        try:
            return pt.store.read_blob(digest)
        except RegistryError:
            return None

    nodes = {node.digest: node for node in walk(root, load)}

    def size_of(digest: Digest) -> int | None:
        node = nodes.get(digest)
        if node is None:
            return None
        if not node.children:
            return node.size
        sizes = [s for s in (size_of(c.digest) for c in node.children) if s is not None]
        return sum(sizes) if sizes else None

    top = nodes.get(root)
    if top is None:
        return [], None, ""
    platforms = [child.platform for child in top.children if child.platform]
    cached = sum(1 for child in top.children if size_of(child.digest) is not None)
    partial = f"{cached} of {len(top.children)} cached" if cached < len(top.children) else ""
    return platforms, size_of(root), partial
