"""Build real images (tar.gz layers, image configs with diff_ids, manifests, indexes) and push
them to a distribution registry over the HTTP API, with the token service's admin user."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field

import requests

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Layer:
    data: bytes  # compressed
    diff_id: str

    @property
    def digest(self) -> str:
        return sha256(self.data)


def make_layer(seed: int, size: int, name: str = "file.bin") -> Layer:
    rng = random.Random(seed)
    # randbytes cannot make hundreds of MiB in one call
    payload = b"".join(rng.randbytes(min(1 << 20, size - i)) for i in range(0, size, 1 << 20))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"data/{name}")
        info.size = len(payload)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(payload))
    tar_bytes = raw.getvalue()
    compressed = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    return Layer(compressed, sha256(tar_bytes))


@dataclass
class Image:
    """One pushed manifest and everything it references (children for an index)."""

    repository: str
    tag: str
    manifest: bytes
    media_type: str
    blobs: dict[str, bytes] = field(default_factory=dict)
    children: list[Image] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def single(repository, tag, layers, *, docker=False, arch="amd64") -> Image:
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        },
        sort_keys=True,
    ).encode()
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": DOCKER_LAYER if docker else OCI_LAYER,
                    "digest": layer.digest,
                    "size": len(layer.data),
                }
                for layer in layers
            ],
        },
        indent=3,
    ).encode()
    blobs = {sha256(config): config, **{layer.digest: layer.data for layer in layers}}
    return Image(repository, tag, manifest, media_type, blobs)


def index(repository, tag, children: list[Image], *, docker=False) -> Image:
    media_type = DOCKER_LIST if docker else OCI_INDEX
    entries = []
    for child in children:
        arch = json.loads(child.blobs[json.loads(child.manifest)["config"]["digest"]])[
            "architecture"
        ]
        entries.append(
            {
                "mediaType": child.media_type,
                "digest": child.digest,
                "size": len(child.manifest),
                "platform": {"architecture": arch, "os": "linux"},
            }
        )
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}, indent=2
    ).encode()
    return Image(repository, tag, manifest, media_type, {}, children)


class Pusher:
    """Pushes images over the registry HTTP API: with the token service's admin user, with
    HTTP Basic credentials (`basic`), or anonymously (no realm, no credentials)."""

    def __init__(
        self,
        registry_url: str,
        token_realm: str | None = None,
        service: str | None = None,
        basic: tuple[str, str] | None = None,
    ) -> None:
        self.url = registry_url
        self.realm = token_realm
        self.service = service
        self.session = requests.Session()
        if basic:
            self.session.auth = basic

    def _token(self, repository: str) -> str:
        response = self.session.get(
            self.realm,
            params={"service": self.service, "scope": f"repository:{repository}:pull,push"},
            auth=("admin", "adminpw"),
            timeout=10,
        )
        response.raise_for_status()
        return response.json()["token"]

    def push(self, image: Image) -> None:
        headers = {}
        if self.realm:
            headers = {"Authorization": f"Bearer {self._token(image.repository)}"}
        for child in image.children:
            self._push_one(child, headers, tag=None)
        self._push_one(image, headers, tag=image.tag)

    def _push_one(self, image: Image, headers: dict, tag: str | None) -> None:
        for digest, data in image.blobs.items():
            start = self.session.post(
                f"{self.url}/v2/{image.repository}/blobs/uploads/", headers=headers, timeout=30
            )
            assert start.status_code == 202, start.text
            location = start.headers["Location"]
            if location.startswith("/"):
                location = self.url + location
            sep = "&" if "?" in location else "?"
            put = self.session.put(
                f"{location}{sep}digest={digest}",
                data=data,
                headers={**headers, "Content-Type": "application/octet-stream"},
                timeout=120,
            )
            assert put.status_code == 201, put.text
        reference = tag or image.digest
        put = self.session.put(
            f"{self.url}/v2/{image.repository}/manifests/{reference}",
            data=image.manifest,
            headers={**headers, "Content-Type": image.media_type},
            timeout=30,
        )
        assert put.status_code == 201, put.text


@dataclass
class Catalog:
    """The images every test can rely on, keyed by a short name."""

    images: dict[str, Image]

    def __getitem__(self, key: str) -> Image:
        return self.images[key]


def standard_images(big_size: int = 48 * 1024 * 1024) -> Catalog:
    shared = make_layer(1, 64 * 1024, "shared.bin")
    amd64 = single("library/alpine", "", [shared, make_layer(2, 200 * 1024)], arch="amd64")
    arm64 = single("library/alpine", "", [shared, make_layer(3, 180 * 1024)], arch="arm64")
    docker_amd = single("library/multidocker", "", [make_layer(4, 50 * 1024)], docker=True)
    docker_arm = single(
        "library/multidocker", "", [make_layer(5, 50 * 1024)], docker=True, arch="arm64"
    )
    images = {
        "alpine": index("library/alpine", "3.19", [amd64, arm64]),
        "busybox": single(
            "library/busybox", "1.36", [shared, make_layer(6, 300 * 1024)], docker=True
        ),
        "multidocker": index("library/multidocker", "1", [docker_amd, docker_arm], docker=True),
        "ocisingle": single("team/app", "v1", [make_layer(7, 100 * 1024)]),
        "big": single("library/big", "1", [make_layer(8, big_size, "big.bin")], docker=True),
        "private": single("private/secret", "1", [make_layer(9, 70 * 1024, "secret.bin")]),
    }
    return Catalog(images)
