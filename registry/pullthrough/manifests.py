"""Manifest parsing: media types, Accept matching, the digests a manifest references, and
the one walk of the manifest graph (index -> manifests -> config and layers) that the GC, the
admin CLI and the inventory share."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from registry.digests import Digest
from registry.mediatypes import DOCKER_SCHEMA1, KNOWN_MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST

_GENERIC_TYPES = {"", "application/octet-stream", "application/json", "text/plain"}

# A descriptor claiming more than this is refused: no real layer is a petabyte, and such a
# manifest would only be a way to make us promise impossible downloads.
MAX_DESCRIPTOR_SIZE = 1 << 40


class InvalidManifest(ValueError):
    pass


def parse_accept(values: Iterable[str]) -> list[str]:
    """Media types from any number of Accept headers, each possibly a comma list."""
    out = []
    for value in values:
        for item in value.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type and media_type not in out:
                out.append(media_type)
    return out


def accepts(accept: list[str], media_type: str) -> bool:
    """No Accept at all, or */*, accepts anything; otherwise the type must be listed."""
    if not accept or "*/*" in accept:
        return True
    return media_type.lower() in accept


def parse_manifest(body: bytes, content_type: str) -> tuple[str, list[Digest]]:
    """Validate a manifest; return its media type and every digest it references."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidManifest("manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidManifest("manifest is not a JSON object")
    declared = doc.get("mediaType")
    media_type = content_type.lower()
    if media_type not in KNOWN_MANIFEST_TYPES and declared in KNOWN_MANIFEST_TYPES:
        media_type = declared  # served as something else (text/html): the document says
    if media_type in _GENERIC_TYPES:
        if isinstance(declared, str) and declared:
            media_type = declared
        elif "manifests" in doc:
            media_type = OCI_INDEX
        elif "config" in doc:
            media_type = OCI_MANIFEST
        elif "fsLayers" in doc:
            media_type = DOCKER_SCHEMA1
        else:
            raise InvalidManifest("cannot tell the manifest's media type")
    references: list[Digest] = []
    descriptors = []
    if isinstance(doc.get("config"), dict):
        descriptors.append(doc["config"])
    for key in ("layers", "manifests", "blobs"):
        items = doc.get(key) or []
        if not isinstance(items, list):
            raise InvalidManifest(f"manifest field {key!r} is not a list")
        descriptors.extend(items)
    for descriptor in descriptors:
        if not isinstance(descriptor, dict):
            raise InvalidManifest("manifest has a descriptor that is not an object")
        size = descriptor.get("size", 0)
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or not 0 <= size <= MAX_DESCRIPTOR_SIZE
        ):
            raise InvalidManifest(f"manifest has a descriptor with an absurd size: {size!r}")
        references.append(_digest(descriptor.get("digest")))
    for layer in doc.get("fsLayers") or []:
        if isinstance(layer, dict):
            references.append(_digest(layer.get("blobSum")))
    return media_type, references


def _digest(value: object) -> Digest:
    if not isinstance(value, str):
        raise InvalidManifest("manifest has a descriptor without a digest")
    try:
        return Digest.parse(value)
    except Exception:
        raise InvalidManifest(f"manifest references an invalid digest {value[:100]!r}") from None


@dataclass(frozen=True)
class Child:
    """An index entry: a manifest of one platform (`linux/arm64/v8`; empty when the entry
    names none, or names `unknown/unknown` as attestation manifests do)."""

    digest: Digest
    platform: str


@dataclass(frozen=True)
class ManifestNode:
    digest: Digest
    media_type: str
    blobs: list[Digest]  # config, layers and other blobs: everything but index children
    children: list[Child]
    size: int  # the descriptors' sizes of `blobs`
    sizes: dict[Digest, int] = field(default_factory=dict)  # each blob's, as described


def manifest_node(digest: Digest, body: bytes, content_type: str = "") -> ManifestNode:
    """What one manifest references, split into index children and blobs."""
    media_type, references = parse_manifest(body, content_type)
    doc = json.loads(body)
    children = [
        Child(_digest(entry.get("digest")), _platform(entry.get("platform")))
        for entry in doc.get("manifests") or []
    ]
    child_digests = {c.digest for c in children}
    descriptors = [doc.get("config"), *(doc.get("layers") or []), *(doc.get("blobs") or [])]
    size = sum(d.get("size", 0) for d in descriptors if isinstance(d, dict))
    blobs = [d for d in references if d not in child_digests]
    sizes = {
        _digest(d.get("digest")): d.get("size", 0)
        for d in descriptors
        if isinstance(d, dict) and d.get("digest") is not None
    }
    return ManifestNode(digest, media_type, blobs, children, size, sizes)


def walk(root: Digest, load: Callable[[Digest], bytes | None]) -> Iterator[ManifestNode]:
    """Every manifest reachable from `root`, each once, parents before their children.
    `load` gives a manifest's body (None: not at hand, so nothing below it is walked); an
    invalid manifest ends its branch the same way."""
    seen: set[Digest] = set()
    stack = [root]
    while stack:
        digest = stack.pop()
        if digest in seen:
            continue
        seen.add(digest)
        body = load(digest)
        if body is None:
            continue
        try:
            node = manifest_node(digest, body)
        except InvalidManifest:
            continue
        yield node
        stack.extend(child.digest for child in reversed(node.children))


def _platform(platform: object) -> str:
    if not isinstance(platform, dict):
        return ""
    label = "/".join(str(platform[k]) for k in ("os", "architecture", "variant") if platform.get(k))
    return "" if label == "unknown/unknown" else label
