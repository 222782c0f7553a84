"""Content digests: parsing and validation, and the hasher that verifies streamed content."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from registry.errors import DigestInvalid

# Algorithm -> length of its lowercase hex encoding. Anything else is refused, so a digest
# can always be used as a path component without further escaping.
ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, slots=True)
class Digest:
    """A canonical digest: the constructor refuses anything else (from a client, an upstream
    or a file name alike), so a Digest is always safe as a path component."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        length = ALGORITHMS.get(self.algorithm)
        if length is None:
            raise DigestInvalid(
                "unsupported digest algorithm", detail={"digest": str(self.algorithm)[:20]}
            )
        if len(self.hex) != length or not _HEX.fullmatch(self.hex):
            raise DigestInvalid("invalid digest encoding", detail={"digest": str(self.hex)[:200]})

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse `algo:hex`; raise DigestInvalid for anything not canonical."""
        algorithm, sep, hexpart = text.partition(":")
        if not sep:
            raise DigestInvalid("invalid digest format", detail={"digest": text[:200]})
        try:
            return cls(algorithm, hexpart)
        except DigestInvalid as exc:
            raise DigestInvalid(exc.message, detail={"digest": text[:200]}) from None

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def matches(self, data: bytes) -> bool:
        return hashlib.new(self.algorithm, data).hexdigest() == self.hex


def parse_or_none(text: object) -> Digest | None:
    """A digest from data that may hold anything (an upstream's descriptor, a header)."""
    if not isinstance(text, str):
        return None
    try:
        return Digest.parse(text)
    except DigestInvalid:
        return None


def sha256_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def looks_like_digest(reference: str) -> bool:
    """Tags cannot contain ':', so any reference with one is meant as a digest."""
    return ":" in reference
