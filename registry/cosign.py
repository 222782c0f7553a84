"""cosign's key-based image signatures: where they live, what they hold, and their check.

What cosign writes (public facts of its format, as `cosign sign --key` does):
- a signature manifest, an OCI image manifest tagged `<alg>-<hex>.sig` in the image's
  repository (or, in OCI 1.1 mode, with `subject` naming the image and `artifactType`
  `application/vnd.dev.cosign.artifact.sig.v1+json`, found through the referrers API);
- one layer per signature, of type `application/vnd.dev.cosign.simplesigning.v1+json`: the
  payload, a "simple signing" JSON document whose `critical.image.docker-manifest-digest`
  names the signed manifest and whose `critical.type` is `cosign container image signature`;
- the signature of that payload's bytes in the layer annotation
  `dev.cosignproject.cosign/signature`: base64 of an ASN.1 DER ECDSA signature over the
  SHA-256 of the payload (P-256 keys, cosign's default).

Pure functions only: fetching the manifests and payloads is registry/pullthrough/policy.py's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from registry.digests import Digest, parse_or_none

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

# `cryptography` is imported where a key is used, not here: every worker imports this module
# (the GC and the UI read its tag names), and only a `verify` rule needs the library (several
# MiB of resident memory per process otherwise).

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_ARTIFACT_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
PAYLOAD_TYPE = "cosign container image signature"
# A payload is a few hundred bytes; anything far larger is not one.
MAX_PAYLOAD = 64 * 1024

IMAGE_CONFIG_TYPES = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
IMAGE_LAYER_PREFIXES = ("application/vnd.oci.image.layer.", "application/vnd.docker.image.rootfs.")
# Layers an attachment with an image config may carry (cosign's signatures, attestations and
# SBOMs), each at most MAX_PAYLOAD bytes of JSON.
ATTACHMENT_LAYER_PREFIXES = (
    SIMPLE_SIGNING,
    "application/vnd.dsse.",
    "application/vnd.in-toto",
    "application/spdx",
    "text/spdx",
    "application/vnd.cyclonedx",
    "application/vnd.syft",
)

# `<alg>-<hex>` (the referrers tag schema) and cosign's `<alg>-<hex>.sig|.att|.sbom`.
_ATTACHED_TAG = re.compile(r"(sha256|sha512)-([0-9a-f]{64}|[0-9a-f]{128})(\.(sig|att|sbom))?")


class Verdict(StrEnum):
    """What a signature check found, best first (the best over all signatures counts)."""

    SIGNED = "signed"
    MISMATCH = "mismatch"
    UNKNOWN_KEY = "unknown_key"
    UNSIGNED = "unsigned"


# The cause as people read it: the reason phrase of a 403, the log, the UI.
REASONS = {
    Verdict.SIGNED: "signed",
    Verdict.MISMATCH: "signature does not match",
    Verdict.UNKNOWN_KEY: "signed by an unknown key",
    Verdict.UNSIGNED: "unsigned",
}


@dataclass(frozen=True)
class Finding:
    verdict: Verdict
    detail: str

    @property
    def reason(self) -> str:
        return REASONS[self.verdict]

    def better(self, other: Finding) -> Finding:
        order = list(Verdict)
        return self if order.index(self.verdict) <= order.index(other.verdict) else other


@dataclass(frozen=True)
class SignatureLayer:
    payload: Digest
    size: int
    signature: str  # base64, as annotated


def load_key(pem: str) -> ec.EllipticCurvePublicKey:
    """A PEM public key as `cosign generate-key-pair` writes it; ValueError otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_public_key(pem.strip().encode())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("only ECDSA public keys (cosign's default, P-256) are supported")
    return key


def key_set_id(pems: list[str]) -> str:
    """Names a set of keys (order and PEM formatting aside): checks cached under one key
    set are forgotten when the configured keys change."""
    from cryptography.hazmat.primitives import serialization

    ders = sorted(
        load_key(pem).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for pem in pems
    )
    return hashlib.sha256(b"".join(hashlib.sha256(d).digest() for d in ders)).hexdigest()[:16]


def attached_subject(tag: str) -> Digest | None:
    """The manifest a tag is attached to (`sha256-<hex>`, `sha256-<hex>.sig`, ...), if any."""
    match = _ATTACHED_TAG.fullmatch(tag)
    if not match:
        return None
    return Digest(match.group(1), match.group(2))


def signature_tag(digest: Digest) -> str:
    return f"{digest.algorithm}-{digest.hex}.sig"


def attachment_layers(body: bytes) -> list[tuple[Digest, int]] | None:
    """Whether a manifest could be served as an attachment (a signature, attestation, SBOM
    or referrers index) rather than checked as an image: None when it is shaped as an image,
    else the layers whose bytes must be JSON documents for it to be one. Only the shape
    decides, never a tag's name, `artifactType` or `subject`. An image layer (or a layer of
    no known type) makes it an image; an image config (cosign's legacy `.sig` and `.att`
    images have one) may carry only small signature, attestation or SBOM layers, each to be
    read as JSON (which no runnable layer is). An index may be one: its children are checked
    on their own."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        return None  # schema 1 is an image format
    if "manifests" in doc:
        return [] if isinstance(doc["manifests"], list) and "layers" not in doc else None
    layers, config = doc.get("layers"), doc.get("config")
    if not isinstance(layers, list) or not isinstance(config, dict):
        return None
    described = []
    for layer in layers:
        kind = layer.get("mediaType") if isinstance(layer, dict) else None
        if not isinstance(kind, str) or kind.startswith(IMAGE_LAYER_PREFIXES) or "tar" in kind:
            return None
        described.append((kind, parse_or_none(layer.get("digest")), layer.get("size")))
    if config.get("mediaType") not in IMAGE_CONFIG_TYPES:
        return []
    out = []
    for kind, digest, size in described:
        if not kind.startswith(ATTACHMENT_LAYER_PREFIXES) or digest is None:
            return None
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_PAYLOAD:
            return None
        out.append((digest, size))
    return out or None


def subjects_named(reference: str, body: bytes) -> list[Digest]:
    """The manifests an attachment says it is of: its tag's `<alg>-<hex>[.sig|.att|.sbom]`
    and its `subject` (claims to be checked, never trusted as they stand)."""
    found = []
    tagged = attached_subject(reference)
    if tagged is not None:
        found.append(tagged)
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    subject = doc.get("subject") if isinstance(doc, dict) else None
    named = parse_or_none(subject.get("digest")) if isinstance(subject, dict) else None
    if named is not None and named not in found:
        found.append(named)
    return found


def signature_layers(body: bytes) -> list[SignatureLayer]:
    """The signatures a signature manifest carries (its other layers are ignored)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    layers = doc.get("layers") if isinstance(doc, dict) else None
    out = []
    for layer in layers if isinstance(layers, list) else []:
        if not isinstance(layer, dict) or layer.get("mediaType") != SIMPLE_SIGNING:
            continue
        annotations = layer.get("annotations")
        signature = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) else None
        size = layer.get("size")
        try:
            payload = Digest.parse(str(layer.get("digest")))
        except Exception:
            continue
        if isinstance(signature, str) and isinstance(size, int) and 0 < size <= MAX_PAYLOAD:
            out.append(SignatureLayer(payload, size, signature))
    return out


def check(
    payload: bytes, signature: str, digest: Digest, keys: list[ec.EllipticCurvePublicKey]
) -> Finding:
    """One signature of `digest`: signed by one of `keys` over this payload, and the payload
    names `digest`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return Finding(Verdict.MISMATCH, "its signature annotation is not base64")
    for key in keys:
        try:
            key.verify(raw, payload, ec.ECDSA(hashes.SHA256()))
            break
        except InvalidSignature:
            continue
    else:
        # ECDSA cannot tell a signature made with another key from an altered payload.
        return Finding(
            Verdict.UNKNOWN_KEY,
            "no configured key verifies its signature (made with another key, or the "
            "payload or signature was altered)",
        )
    try:
        critical = json.loads(payload)["critical"]
        named = critical["image"]["docker-manifest-digest"]
        kind = critical["type"]
    except (ValueError, KeyError, TypeError):
        return Finding(Verdict.MISMATCH, "its payload is not a cosign signature payload")
    if kind != PAYLOAD_TYPE:
        return Finding(Verdict.MISMATCH, f"its payload is of type {str(kind)[:80]!r}")
    if named != str(digest):
        return Finding(Verdict.MISMATCH, f"it signs {str(named)[:80]}, not {digest}")
    return Finding(Verdict.SIGNED, "a configured key signed it")
