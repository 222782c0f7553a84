"""What the cache holds, for people: a repository's tags with digest, platforms, size, last
pull and pull count. Read by the web UI and the admin CLI."""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from registry.cosign import REASONS, Verdict, attached_subject
from registry.digests import Digest
from registry.errors import RegistryError
from registry.names import Target
from registry.pullthrough.manifests import walk
from registry.pullthrough.service import PullThrough


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
    signature: str = ""  # under a verify policy: signed, unsigned, failed (why), not checked
    pinned: str = ""  # by an admin, or by a gc.pins glob


def signature_labels(pt: PullThrough, target: Target, tags: dict[str, Digest]) -> dict[str, str]:
    """What the signature policy found for each tag's manifest (none: no policy applies)."""
    rule = target.registry.verify_rule(target.repository)
    if rule is None or pt.policy is None:
        return {}
    chosen = {t: d for t, d in tags.items() if attached_subject(t) is None}
    try:
        found = pt.policy.known(rule, list(chosen.values()))
    except RedisError:
        return {}
    labels = {}
    for tag, stored in zip(chosen, found, strict=True):
        if stored is None:
            labels[tag] = "not checked yet"
        elif stored.verdict == Verdict.SIGNED:
            labels[tag] = "signed"
        elif stored.verdict == Verdict.UNSIGNED:
            labels[tag] = "unsigned"
        else:
            labels[tag] = f"failed: {REASONS[Verdict(stored.verdict)]}"
    return labels


def tag_rows(pt: PullThrough, target: Target) -> list[TagRow]:
    tags = pt.store.list_tags(target)
    members = [f"{target}:{tag}" for tag in tags]
    try:
        pulled, counts = pt.coord.pulls.history(members)
    except RedisError:
        pulled, counts = [None] * len(tags), [0] * len(tags)
    rows = []
    now = time.time()
    records = {tag: pt.store.read_tag(target, tag) for tag in tags}
    signatures = signature_labels(
        pt, target, {tag: r.digest for tag, r in records.items() if r is not None}
    )
    by_admin = pt.store.pinned_tags(str(target))

    def pinned(tag: str) -> str:
        if tag in by_admin:
            return "by an admin"
        return "by gc.pins" if pt.settings.gc.pinned(str(target), tag) else ""

    for tag, last, count in zip(tags, pulled, counts, strict=True):
        record = records[tag]
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
                signature=signatures.get(tag, ""),
                pinned=pinned(tag),
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
