"""Rewrite the image references of compose files to pull through the cache, and back.

Docker's `registry-mirrors` only covers Docker Hub. For any other registry the cache serves
`<cache>/<registry>/<repository>` (the path-prefix route), so `ghcr.io/immich-app/server:v1`
becomes `192.168.1.5:5050/ghcr.io/immich-app/server:v1`. Only `image:` values whose
registry is one of `registries` change; tags, digests, `${VAR}` parts, quotes, comments and
line endings are kept byte for byte, so `undo` restores the file exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_IMAGE = re.compile(
    r"^(?P<lead>[ \t]*(?:-[ \t]+)?image[ \t]*:[ \t]*)(?P<q>[\"']?)(?P<ref>[^\"'\s#]+)(?P=q)"
)


def _registry_of(ref: str) -> str | None:
    """The registry host a reference names, by Docker's rule (a first component with a dot,
    a colon or `localhost`), or None for Docker Hub's short form."""
    first, slash, _rest = ref.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


def _map_lines(text: str, change: Callable[[str], str | None]) -> tuple[str, int]:
    out, changed = [], 0
    for line in text.splitlines(keepends=True):
        match = _IMAGE.match(line)
        if match:
            new_ref = change(match.group("ref"))
            if new_ref is not None:
                start, end = match.span("ref")
                line = line[:start] + new_ref + line[end:]
                changed += 1
        out.append(line)
    return "".join(out), changed


def rewrite(text: str, cache: str, registries: set[str]) -> tuple[str, int]:
    """Route images of `registries` through `cache` (`host:port`); (new text, changes)."""

    def change(ref: str) -> str | None:
        if ref.startswith(f"{cache}/"):
            return None  # already routed
        registry = _registry_of(ref)
        return f"{cache}/{ref}" if registry in registries else None

    return _map_lines(text, change)


def undo(text: str, cache: str) -> tuple[str, int]:
    """Take `cache/` off every image reference that has it; (new text, changes)."""
    prefix = f"{cache}/"
    return _map_lines(text, lambda ref: ref[len(prefix) :] if ref.startswith(prefix) else None)
