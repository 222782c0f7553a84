"""Hourly figures of what the cache saves: `pt:hourly:<registry>:<YYYYMMDDHH>` (UTC hours),
kept 8 days. `saved`: manifest GETs answered without an upstream GET (from the cache, or
revalidated with a HEAD, which Docker Hub does not count); `fetched`: those that needed one;
`quota_remaining` and `quota_limit`: the upstream's quota as last seen in that hour.

Counted in each process and written every FLUSH_EVERY seconds (the manifest route is the
hottest there is: no Redis round trip per request)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from registry.coordination.batches import Flusher
from registry.coordination.keys import PREFIX

FLUSH_EVERY = 2.0
KEEP = 8 * 86400


@dataclass(frozen=True)
class Week:
    hours: list[tuple[str, dict[str, int]]]  # oldest first: (YYYYMMDDHH, figures)
    saved_today: int  # today: the UTC day
    saved: int
    fetched: int

    @property
    def day(self) -> list[tuple[str, dict[str, int]]]:
        return self.hours[-24:]


def hour_of(when: float) -> str:
    return time.strftime("%Y%m%d%H", time.gmtime(when))


def hourly_key(registry: str, hour: str) -> str:
    return f"{PREFIX}hourly:{registry}:{hour}"


class Hourly:
    def __init__(self, client: redis.Redis, quota: Callable[[str], dict] | None = None) -> None:
        self.redis = client
        self.quota = quota  # upstream_status of a registry (limit, remaining)
        self._pending: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()
        self._flusher = Flusher(
            self.flush, lambda: bool(self._pending), self._lock, FLUSH_EVERY, "hourly"
        )

    def note(self, registry: str, saved: bool) -> None:
        """One manifest GET answered: `saved` when it needed no upstream GET."""
        with self._lock:
            self._pending[(registry, hour_of(time.time()), "saved" if saved else "fetched")] += 1
            self._flusher.wake()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, Counter()
        if not pending:
            return
        with contextlib.suppress(RedisError):  # lost counts are lost figures, not content
            pipe = self.redis.pipeline()
            for (registry, hour, field), count in pending.items():
                key = hourly_key(registry, hour)
                pipe.hincrby(key, field, count)
                pipe.expire(key, KEEP)
            for registry, hour in {(r, h) for r, h, _ in pending}:
                status = self.quota(registry) if self.quota else {}
                fields: dict[FieldT, EncodableT] = {
                    f"quota_{k}": status[k]
                    for k in ("remaining", "limit")
                    if str(status.get(k, "")).isdigit()
                }
                if fields:
                    pipe.hset(hourly_key(registry, hour), mapping=fields)
            pipe.execute()

    def week(self, registry: str, now: float) -> Week:
        """The last 7 days' hours up to `now` with their sums, for the UI and /metrics."""
        hours = self.hours(registry, now, 7 * 24)
        today = hour_of(now)[:8]
        return Week(
            hours=hours,
            saved_today=sum(f.get("saved", 0) for h, f in hours if h[:8] == today),
            saved=sum(f.get("saved", 0) for _, f in hours),
            fetched=sum(f.get("fetched", 0) for _, f in hours),
        )

    def hours(self, registry: str, now: float, count: int) -> list[tuple[str, dict[str, int]]]:
        """The last `count` hours up to `now`, oldest first: (hour, figures)."""
        hours = [hour_of(now - 3600 * back) for back in range(count - 1, -1, -1)]
        pipe = self.redis.pipeline()
        for hour in hours:
            pipe.hgetall(hourly_key(registry, hour))
        out = []
        for hour, raw in zip(hours, pipe.execute(), strict=True):
            figures = {}
            for key, value in raw.items():
                with contextlib.suppress(ValueError):
                    figures[key.decode()] = int(value)
            out.append((hour, figures))
        return out
