"""Pull history: `pt:pulled` (last pull time of every tag and digest, for the GC's
recency) and `pt:pulls` (pull counts, for people)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable

import redis
from redis.exceptions import RedisError

from registry.coordination.batches import Flusher
from registry.coordination.keys import PREFIX, text

PULLED_KEY = f"{PREFIX}pulled"
PULLS_KEY = f"{PREFIX}pulls"
# A member's first pull in this long is written at once; later ones are gathered and
# written by a background flush every PULLS_FLUSH_EVERY (pulls are hot paths).
PULLED_EVERY = 60.0
PULLS_FLUSH_EVERY = 2.0


class Pulls:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._written: dict[str, float] = {}
        self._pending: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self._flusher = Flusher(
            self._flush, lambda: bool(self._pending), self._lock, PULLS_FLUSH_EVERY, "pulls flush"
        )

    def touch(self, member: str) -> None:
        """Count a pull and its time: a member's first pull in a minute is written at once
        (the GC may be deciding about it), later ones within PULLS_FLUSH_EVERY."""
        now = time.monotonic()
        with self._lock:
            self._pending[member] = self._pending.get(member, 0) + 1
            self._last[member] = time.time()
            if now - self._written.get(member, -PULLED_EVERY) < PULLED_EVERY:
                self._flusher.wake()
                return
            self._written[member] = now
        self._flush([member])

    def _flush(self, members: Iterable[str] | None = None) -> None:
        with self._lock:
            chosen = list(self._pending) if members is None else list(members)
            counts = {m: self._pending.pop(m) for m in chosen if m in self._pending}
            times = {m: self._last.pop(m) for m in counts}
        if not counts:
            return
        with contextlib.suppress(RedisError):  # lost counts are lost figures, not content
            pipe = self.redis.pipeline()
            pipe.zadd(PULLED_KEY, times)
            for member, count in counts.items():
                pipe.hincrby(PULLS_KEY, member, count)
            pipe.execute()

    def history(self, members: list[str]) -> tuple[list[float | None], list[int]]:
        """Last pull time (None: never) and pull count of each member."""
        if not members:
            return [], []
        pipe = self.redis.pipeline()
        pipe.zmscore(PULLED_KEY, members)
        pipe.hmget(PULLS_KEY, members)
        times, counts = pipe.execute()
        return list(times), [int(c) if c else 0 for c in counts]

    def times(
        self, members: list[str], default: float, record_default: bool = False
    ) -> dict[str, float]:
        """Last pull time of each member, `default` for unknown ones (also written to Redis
        when `record_default`, so the next run sees the same time)."""
        if not members:
            return {}
        scores = self.redis.zmscore(PULLED_KEY, members)
        if record_default:
            unknown = {m: default for m, s in zip(members, scores, strict=True) if s is None}
            if unknown:
                self.redis.zadd(PULLED_KEY, unknown, nx=True)
        return {m: default if s is None else s for m, s in zip(members, scores, strict=True)}

    def recent(self, since: float) -> list[str]:
        """Members pulled at `since` or later (tags `<repo>:<tag>`, digests `<repo>@<d>`)."""
        return [text(m) for m in self.redis.zrangebyscore(PULLED_KEY, since, "+inf")]

    def has_history(self) -> bool:
        return bool(self.redis.exists(PULLED_KEY))

    def forget(self, members: list[str]) -> None:
        if members:
            self.redis.zrem(PULLED_KEY, *members)
