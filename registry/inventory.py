"""What the cache holds, for people: a repository's tags with digest, platforms, size, last
pull and pull count. Read by the web UI and the admin CLI."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from registry.digests import Digest
from registry.errors import RegistryError
from registry.names import Target
from registry.pullthrough import PullThrough


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
        body = pt.store.read_blob(Digest.parse(digest))
    except RegistryError:
        return [], None, ""
    if body is None:
        return [], None, ""
    try:
        doc = json.loads(body)
    except ValueError:
        return [], None, ""
    if "manifests" in doc:
        platforms, size, cached = [], 0, 0
        entries = [m for m in doc.get("manifests") or [] if isinstance(m, dict)]
        for entry in entries:
            platform = entry.get("platform") or {}
            label = "/".join(
                str(platform[k]) for k in ("os", "architecture", "variant") if platform.get(k)
            )
            if label and label != "unknown/unknown":
                platforms.append(label)
            _, child_size, _ = describe(pt, str(entry.get("digest", "")))
            if child_size is not None:
                size += child_size
                cached += 1
        partial = f"{cached} of {len(entries)} cached" if cached < len(entries) else ""
        return platforms, size if cached else None, partial
    descriptors = [doc.get("config") or {}, *(doc.get("layers") or [])]
    size = sum(d.get("size", 0) for d in descriptors if isinstance(d, dict))
    return [], size, ""
