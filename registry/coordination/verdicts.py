"""Signature checks: `pt:verify:<keyset>:<digest>`, what the check of a manifest against a
set of cosign keys found, and `pt:verify:<keyset>:attached:<digest>`, the subject a
manifest was reached as an attachment of; shared by every worker and node
(registry/pullthrough/policy.py)."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass

import redis
from redis.exceptions import RedisError

from registry.coordination.keys import PREFIX
from registry.digests import Digest


@dataclass(frozen=True)
class StoredVerdict:
    verdict: str  # registry.cosign.Verdict's value
    detail: str
    checked: float
    via: str = ""  # the verified index a child is served under


def verdict_key(key_set: str, digest: Digest) -> str:
    return f"{PREFIX}verify:{key_set}:{digest}"


def attached_key(key_set: str, digest: Digest) -> str:
    return f"{PREFIX}verify:{key_set}:attached:{digest}"


class Verdicts:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def read(self, key_set: str, digests: list[Digest]) -> list[StoredVerdict | None]:
        """Each digest's verdict; None when never checked, expired, malformed, or Redis is
        away (check again)."""
        if not digests:
            return []
        try:
            raws = self.redis.mget([verdict_key(key_set, d) for d in digests])
        except RedisError:
            return [None] * len(digests)
        return [_parse(raw) for raw in raws]

    def write(
        self,
        key_set: str,
        digest: Digest,
        verdict: str,
        detail: str,
        ttl: float,
        children: list[Digest] | None = None,
    ) -> None:
        """The verdict of `digest`, and the same for the `children` of an index it covers."""
        checked = round(time.time(), 3)
        entries = {digest: ""} | {child: str(digest) for child in children or []}
        with contextlib.suppress(RedisError):  # unrecorded: checked again next time
            pipe = self.redis.pipeline()
            for item, via in entries.items():
                value = {"verdict": verdict, "detail": detail, "checked": checked, "via": via}
                pipe.set(verdict_key(key_set, item), json.dumps(value), px=int(ttl * 1000))
            pipe.execute()

    def mark_attached(
        self, key_set: str, subject: Digest, digests: list[Digest], ttl: float
    ) -> None:
        """`digests` were reached as attachments (signatures, referrers) of `subject`."""
        if not digests:
            return
        with contextlib.suppress(RedisError):  # unrecorded: looked up again next time
            pipe = self.redis.pipeline()
            for digest in digests:
                pipe.set(attached_key(key_set, digest), str(subject), px=int(ttl * 1000))
            pipe.execute()

    def attached(self, key_set: str, digest: Digest) -> bool:
        try:
            return bool(self.redis.exists(attached_key(key_set, digest)))
        except RedisError:
            return False  # looked up again


def _parse(raw: bytes | str | None) -> StoredVerdict | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return StoredVerdict(
            str(data["verdict"]), str(data["detail"]), float(data["checked"]), str(data["via"])
        )
    except (ValueError, KeyError, TypeError):
        return None
