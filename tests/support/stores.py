"""Populate a real content store on disk the way pull-through fills it, for GC tests and the
GC benchmark: manifests with their revisions and links, blobs, tags."""

from __future__ import annotations

import hashlib
import os
import random

from registry.config import RegistrySettings
from registry.digests import Digest
from registry.names import Repository, Target
from registry.store import ContentStore, TagRecord
from tests.support.images import Image, Layer, index, single


def raw_layer(rng: random.Random, size: int) -> Layer:
    """Random bytes standing in for a layer (the store never unpacks layers)."""
    data = rng.randbytes(size)
    return Layer(data, "sha256:" + hashlib.sha256(data).hexdigest())


def random_image(rng: random.Random, repository: str, tag: str, pool: list[Layer]) -> Image:
    """An image of 1-3 layers from `pool`, or (one time in four) an index of two of them."""

    def one(arch: str) -> Image:
        return single(
            repository,
            tag,
            rng.sample(pool, rng.randint(1, min(3, len(pool)))),
            arch=arch,
            docker=rng.random() < 0.5,
        )

    if rng.random() < 0.25:
        return index(repository, tag, [one("amd64"), one("arm64")])
    return one("amd64")


def put_manifest(store: ContentStore, target: Target, image: Image) -> None:
    digest = Digest.parse(image.digest)
    store.put_verified_bytes(digest, image.manifest)
    for reference in [*image.blobs, *(child.digest for child in image.children)]:
        store.link_blob(target, Digest.parse(reference))
    store.put_manifest_revision(target, digest, image.media_type)


def cache_image(
    store: ContentStore,
    image: Image,
    *,
    registry: str = "docker.io",
    children: bool = True,
    repository: str | None = None,
) -> None:
    """What pull-through leaves on disk after a full pull of `image` by its tag (an index's
    children under the index's repository)."""
    repository = repository or image.repository
    target = Target(RegistrySettings(registry, f"https://{registry}"), Repository(repository))
    for digest, data in image.blobs.items():
        store.put_verified_bytes(Digest.parse(digest), data)
    if children:
        for child in image.children:
            cache_image(store, child, registry=registry, repository=repository)
    put_manifest(store, target, image)
    if image.tag:
        store.write_tag(
            target, image.tag, TagRecord(Digest.parse(image.digest), image.media_type, 0.0)
        )


def needed(image: Image) -> set[str]:
    """Every digest a complete pull of `image` reads."""
    out = {image.digest, *image.blobs}
    for child in image.children:
        out |= needed(child)
    return out


def blob_exists(store: ContentStore, digest: str) -> bool:
    return store.blob_size(Digest.parse(digest)) is not None


def age(path: os.PathLike | str, seconds: float) -> None:
    """Make a file look `seconds` older."""
    info = os.stat(path)
    os.utime(path, (info.st_atime - seconds, info.st_mtime - seconds))
