"""Signatures made exactly as `cosign sign --key` writes them (public facts of its format):
the simple-signing payload, the signature manifest with its one layer and annotation, the
legacy `<alg>-<hex>.sig` tag, and, in OCI 1.1 mode, `subject` + `artifactType` found through
the referrers tag schema (an index tagged `<alg>-<hex>`) on a registry without the API."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.images import OCI_INDEX, OCI_MANIFEST, Image, sha256

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIG_ARTIFACT_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
SBOM_ARTIFACT_TYPE = "application/spdx+json"


@dataclass
class Key:
    private: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> Key:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def public_pem(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self.private.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def payload_for(reference: str, digest: str) -> bytes:
    """cosign's simple-signing payload (its byte layout: compact JSON, this key order)."""
    return json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": reference},
                "image": {"docker-manifest-digest": digest},
                "type": "cosign container image signature",
            },
            "optional": None,
        },
        separators=(",", ":"),
    ).encode()


def signature_image(
    subject: Image,
    key: Key,
    *,
    payload: bytes | None = None,
    signed: bytes | None = None,
    oci11: bool = False,
) -> Image:
    """The signature manifest of `subject`. `payload` replaces what is stored (a tampered
    or foreign payload), `signed` what the signature is made over (default: the payload)."""
    payload = payload or payload_for(f"registry.test/{subject.repository}", subject.digest)
    signature = key.sign(signed if signed is not None else payload)
    layer = {
        "mediaType": SIMPLE_SIGNING,
        "size": len(payload),
        "digest": sha256(payload),
        "annotations": {SIGNATURE_ANNOTATION: signature},
    }
    if oci11:
        config = b"{}"
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": SIG_ARTIFACT_TYPE,
            "config": {"mediaType": EMPTY_CONFIG, "size": 2, "digest": sha256(config)},
            "layers": [layer],
            "subject": descriptor(subject),
        }
        tag = ""
    else:
        config = json.dumps(
            {
                "architecture": "",
                "config": {},
                "created": "0001-01-01T00:00:00Z",
                "history": [{"created": "0001-01-01T00:00:00Z"}],
                "os": "",
                "rootfs": {"type": "layers", "diff_ids": [sha256(payload)]},
            },
            separators=(",", ":"),
        ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "size": len(config),
                "digest": sha256(config),
            },
            "layers": [layer],
        }
        tag = subject.digest.replace(":", "-") + ".sig"
    body = json.dumps(manifest, separators=(",", ":")).encode()
    return Image(
        subject.repository,
        tag,
        body,
        OCI_MANIFEST,
        {sha256(config): config, sha256(payload): payload},
    )


def sbom_image(subject: Image, document: bytes) -> Image:
    """An SBOM attached to `subject` (OCI 1.1: subject and artifactType, empty config)."""
    config = b"{}"
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SBOM_ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_CONFIG, "size": 2, "digest": sha256(config)},
        "layers": [
            {"mediaType": SBOM_ARTIFACT_TYPE, "size": len(document), "digest": sha256(document)}
        ],
        "subject": descriptor(subject),
        "annotations": {"org.opencontainers.image.created": "2026-11-30T00:00:00Z"},
    }
    body = json.dumps(manifest, separators=(",", ":")).encode()
    return Image(
        subject.repository,
        "",
        body,
        OCI_MANIFEST,
        {sha256(config): config, sha256(document): document},
    )


def descriptor(image: Image, **extra) -> dict:
    return {
        "mediaType": image.media_type,
        "digest": image.digest,
        "size": len(image.manifest),
        **extra,
    }


def referrer_descriptor(artifact: Image) -> dict:
    """How a referrers list names an artifact: its artifactType and annotations carried up."""
    doc = json.loads(artifact.manifest)
    out = descriptor(artifact, artifactType=doc["artifactType"])
    if doc.get("annotations"):
        out["annotations"] = doc["annotations"]
    return out


def tag_schema_index(subject: Image, artifacts: list[Image]) -> Image:
    """The referrers tag schema: an index tagged `<alg>-<hex>` listing the referrers."""
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [referrer_descriptor(a) for a in artifacts],
        },
        separators=(",", ":"),
    ).encode()
    return Image(subject.repository, subject.digest.replace(":", "-"), body, OCI_INDEX)
