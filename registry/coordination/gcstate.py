"""The GC's state and the store's figures: `pt:gc:lock`, `pt:gc:live`, `pt:gc:last`,
`pt:gc:history`, `pt:gc:totals`, `pt:gc:scheduled` and `pt:store`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from redis.exceptions import RedisError

from registry.coordination.keys import PREFIX, text
from registry.coordination.leases import Lease
from registry.digests import Digest

GC_LOCK_KEY = f"{PREFIX}gc:lock"
GC_LIVE_KEY = f"{PREFIX}gc:live"
GC_LAST_KEY = f"{PREFIX}gc:last"
GC_HISTORY_KEY = f"{PREFIX}gc:history"
GC_SLOT_KEY = f"{PREFIX}gc:scheduled"
GC_TOTALS_KEY = f"{PREFIX}gc:totals"
STORE_KEY = f"{PREFIX}store"
GC_LOCK_TTL = 10.0


class GcState:
    def __init__(self, client: redis.Redis, owner: str) -> None:
        self.redis = client
        self.owner = owner

    def lease(self) -> Lease:
        return Lease(self.redis, GC_LOCK_KEY, GC_LOCK_TTL, self.owner)

    def note_live(self, digests: Iterable[Digest]) -> None:
        """Tell a running sweep that these digests were just referenced. Called after the
        references are on disk, so a sweep that started later sees them there anyway."""
        with contextlib.suppress(RedisError):
            if self.redis.exists(GC_LOCK_KEY):
                pipe = self.redis.pipeline()
                pipe.sadd(GC_LIVE_KEY, *[str(d) for d in digests])
                pipe.expire(GC_LIVE_KEY, 3600)
                pipe.execute()

    def is_live(self, digest: Digest) -> bool:
        return bool(self.redis.sismember(GC_LIVE_KEY, str(digest)))

    def clear_live(self) -> None:
        with contextlib.suppress(RedisError):
            self.redis.delete(GC_LIVE_KEY)

    def record(self, report: dict) -> None:
        flat = {
            k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in report.items()
        }
        pipe = self.redis.pipeline()
        pipe.delete(GC_LAST_KEY)
        pipe.hset(GC_LAST_KEY, mapping=flat)
        pipe.lpush(GC_HISTORY_KEY, json.dumps(report))
        pipe.ltrim(GC_HISTORY_KEY, 0, 49)
        if not report.get("dry_run"):
            # A failed sweep counts too: it may have freed bytes before it failed.
            pipe.hincrby(GC_TOTALS_KEY, "runs", 1)
            pipe.hincrby(GC_TOTALS_KEY, "freed_bytes", int(report.get("freed_bytes") or 0))
        pipe.execute()

    def last(self) -> dict[str, str]:
        return {text(k): text(v) for k, v in self.redis.hgetall(GC_LAST_KEY).items()}

    def totals(self) -> dict[str, int]:
        """runs and freed_bytes over every sweep (dry runs excluded)."""
        return _ints(self.redis.hgetall(GC_TOTALS_KEY))

    def take_slot(self, interval: float) -> bool:
        """True for the one scheduler that enqueues this interval's sweep."""
        return bool(
            self.redis.set(GC_SLOT_KEY, self.owner, nx=True, px=max(1000, int(interval * 900)))
        )


class StoreTotals:
    """bytes and blobs of the store's committed content, set exactly by each walk of the
    store and counted between walks."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        # Only a total that a walk of the store set is counted on: after FLUSHALL, counting
        # from zero would show a part of the store as the whole.
        self._count = client.register_script(
            "if redis.call('EXISTS', KEYS[1]) == 1 then "
            "redis.call('HINCRBY', KEYS[1], 'bytes', ARGV[1]); "
            "redis.call('HINCRBY', KEYS[1], 'blobs', ARGV[2]) end"
        )

    def count(self, size: int, blobs: int = 1) -> None:
        """Blobs were committed (or, negative, deleted): keep pt:store current between the
        walks of the store that set it exactly."""
        with contextlib.suppress(RedisError):
            self._count(keys=[STORE_KEY], args=[size, blobs])

    def start_empty(self) -> None:
        """The store was seen empty: count from zero (what another process set stays)."""
        pipe = self.redis.pipeline()
        pipe.hsetnx(STORE_KEY, "bytes", 0)
        pipe.hsetnx(STORE_KEY, "blobs", 0)
        pipe.execute()

    def set(self, size: int, blobs: int) -> None:
        """What a walk of the store measured (a sweep's start, `rebuild-index`)."""
        self.redis.hset(STORE_KEY, mapping={"bytes": size, "blobs": blobs})

    def read(self) -> dict[str, int]:
        """bytes and blobs; empty until first counted."""
        return _ints(self.redis.hgetall(STORE_KEY))


def _ints(raw: Mapping[Any, Any]) -> dict[str, int]:
    out = {}
    for key, value in raw.items():
        with contextlib.suppress(ValueError):
            out[key.decode()] = int(value)
    return out
