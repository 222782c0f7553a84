"""Followed tags (registry/pullthrough/follower.py): `pt:follow:<registry>/<repository>:<tag>`
(each tag's state), `pt:follow:due` (when each is checked next), `pt:follow:tags:*` (a
repository's upstream tag list, asked once per interval), `pt:follow:totals` (what the
follower asked of upstream and fetched), `pt:follow:spent` (bytes fetched in this budget
window), `pt:follow:scheduled` (one tick enqueued per tick interval) and `pt:follow:lock`
(one tick running at a time)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from registry.coordination.keys import PREFIX, text
from registry.coordination.leases import Lease

DUE_KEY = f"{PREFIX}follow:due"
TOTALS_KEY = f"{PREFIX}follow:totals"
TICK_KEY = f"{PREFIX}follow:scheduled"
LOCK_KEY = f"{PREFIX}follow:lock"
SPENT_KEY = f"{PREFIX}follow:spent"
LOCK_TTL = 30.0


def follow_key(member: str) -> str:
    return f"{PREFIX}follow:{member}"


@dataclass
class FollowRecord:
    member: str  # <registry>/<repository>:<tag>
    pattern: str = ""
    state: str = "waiting"
    digest: str = ""
    previous: list[str] = field(default_factory=list)
    last_check: float = 0.0
    next_check: float = 0.0
    message: str = ""
    fetched_bytes: int = 0

    @classmethod
    def parse(cls, member: str, raw: dict[bytes, bytes], next_check: float | None) -> FollowRecord:
        text = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            previous = [str(d) for d in json.loads(text.get("previous") or "[]")]
        except ValueError:
            previous = []
        return cls(
            member,
            pattern=text.get("pattern", ""),
            state=text.get("state", "waiting"),
            digest=text.get("digest", ""),
            previous=previous,
            last_check=_float(text.get("last_check")),
            next_check=next_check or 0.0,
            message=text.get("message", ""),
            fetched_bytes=int(_float(text.get("fetched_bytes"))),
        )


class Follows:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def track(self, member: str, pattern: str, first_check: float) -> bool:
        """Follow `member` (no change if it is followed already); True when new."""
        pipe = self.redis.pipeline()
        pipe.hsetnx(follow_key(member), "pattern", pattern)
        pipe.zadd(DUE_KEY, {member: first_check}, nx=True)
        new, _ = pipe.execute()
        return bool(new)

    def untrack(self, members: list[str]) -> None:
        if members:
            pipe = self.redis.pipeline()
            pipe.zrem(DUE_KEY, *members)
            pipe.delete(*[follow_key(m) for m in members])
            pipe.execute()

    def followed(self) -> list[str]:
        return [text(m) for m in self.redis.zrange(DUE_KEY, 0, -1)]

    def due(self, now: float) -> list[str]:
        return [text(m) for m in self.redis.zrangebyscore(DUE_KEY, "-inf", now)]

    def read(self, members: list[str]) -> list[FollowRecord]:
        if not members:
            return []
        pipe = self.redis.pipeline()
        for member in members:
            pipe.hgetall(follow_key(member))
        pipe.zmscore(DUE_KEY, members)
        *raws, scores = pipe.execute()
        return [
            FollowRecord.parse(m, raw, score)
            for m, raw, score in zip(members, raws, scores, strict=True)
        ]

    def update(self, member: str, next_check: float | None = None, **fields: object) -> None:
        values: dict[FieldT, EncodableT] = {
            k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in fields.items()
        }
        pipe = self.redis.pipeline()
        if values:
            pipe.hset(follow_key(member), mapping=values)
        if next_check is not None:
            pipe.zadd(DUE_KEY, {member: next_check}, xx=True)
        pipe.execute()

    def upstream_tags(self, repo: str) -> list[str] | None:
        raw = self.redis.get(f"{PREFIX}follow:tags:{repo}")
        return json.loads(raw) if raw is not None else None

    def remember_upstream_tags(self, repo: str, tags: Sequence[str], ttl: float) -> None:
        self.redis.set(f"{PREFIX}follow:tags:{repo}", json.dumps(list(tags)), px=int(ttl * 1000))

    def count(self, registry: str, what: str, amount: int = 1) -> None:
        with contextlib.suppress(RedisError):  # a lost count is a lost figure
            self.redis.hincrby(TOTALS_KEY, f"{registry}|{what}", amount)

    def totals(self) -> dict[tuple[str, str], int]:
        out = {}
        for key, value in self.redis.hgetall(TOTALS_KEY).items():
            registry, _, what = text(key).partition("|")
            with contextlib.suppress(ValueError):
                out[(registry, what)] = int(value)
        return out

    def spent(self) -> tuple[int, float]:
        """Bytes fetched in the current budget window, and the seconds until it ends."""
        pipe = self.redis.pipeline()
        pipe.get(SPENT_KEY)
        pipe.pttl(SPENT_KEY)
        raw, ttl = pipe.execute()
        return int(raw or 0), max(0.0, (ttl or 0) / 1000)

    def spend(self, amount: int, window: float) -> None:
        """Count bytes fetched; the window starts with the first bytes and lasts `window` s."""
        pipe = self.redis.pipeline()
        pipe.set(SPENT_KEY, 0, nx=True, px=max(1000, int(window * 1000)))
        pipe.incrby(SPENT_KEY, amount)
        pipe.execute()

    def take_tick(self, owner: str, seconds: float) -> bool:
        """True for the one scheduler that runs this tick."""
        return bool(self.redis.set(TICK_KEY, owner, nx=True, px=max(1000, int(seconds * 900))))

    def lease(self, owner: str) -> Lease:
        """Held by the one tick running (a long fetch may outlast the scheduler's tick)."""
        return Lease(self.redis, LOCK_KEY, LOCK_TTL, owner)

    def kept(self) -> list[tuple[str, str]]:
        """(`<registry>/<repository>`, digest) of each followed tag's previous digests: the GC
        keeps them (an offline rollback)."""
        out: list[tuple[str, str]] = []
        for record in self.read(self.followed()):
            repo = record.member.rpartition(":")[0]
            out.extend((repo, digest) for digest in record.previous)
        return out


def _float(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0
