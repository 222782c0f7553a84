"""The health of one upstream as every process sees it: its circuit breaker, its probe
slot and its last rate-limit headers, in Redis (`pt:upstream:<registry>:*`; the key schema
is in registry/coordination/__init__.py). Beside the client whose calls feed it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable

import redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from registry.config.settings import UpstreamSettings

PREFIX = "pt:"
RATELIMIT_TTL = 24 * 3600


def upstream_key(registry: str, what: str) -> str:
    return f"{PREFIX}upstream:{registry}:{what}"


def _breaker_json(value: bytes) -> dict:
    try:
        state = json.loads(value)
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


def upstream_status(client: redis.Redis, registry: str) -> dict:
    """What Redis knows of an upstream, for people and /metrics: its last quota headers
    (limit, remaining, window, source, updated; strings) and `breaker`, the JSON that opened
    its breaker while it is open (else None), with `breaker_seconds` left. Raises RedisError."""
    pipe = client.pipeline()
    pipe.hgetall(upstream_key(registry, "ratelimit"))
    pipe.get(upstream_key(registry, "breaker"))
    pipe.pttl(upstream_key(registry, "breaker"))
    quota, breaker, pttl = pipe.execute()
    status: dict = {k.decode(): v.decode() for k, v in quota.items()}
    status["breaker"] = _breaker_json(breaker) if breaker is not None else None
    status["breaker_seconds"] = max(pttl, 0) / 1000 if breaker is not None else 0.0
    return status


class UpstreamHealth:
    """Circuit breaker and rate-limit record of one upstream, shared by every process.

    `failure_threshold` failures within `window` seconds open the breaker for `backoff`
    seconds; a 429 opens it for its Retry-After. While open, callers fail at once (and serve
    from cache) instead of waiting for timeouts. When it closes, the next call probes: the
    failure count is kept one short of the threshold, so a failed probe reopens it.
    While it is open for failures (not for a 429), one call per `probe_interval` from all
    processes together still goes out as a probe; an answer closes the breaker, so service
    resumes within `probe_interval` of the upstream's return, not `backoff`.
    Redis trouble never blocks a call: the breaker then stays closed.
    """

    def __init__(
        self,
        client: redis.Redis,
        registry: str,
        *,
        failure_threshold: int,
        window: float,
        backoff: float,
        probe_interval: float = UpstreamSettings.breaker_probe_interval,
        max_retry_after: float = UpstreamSettings.rate_limit_max_backoff,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_retry_after = max_retry_after
        self.redis = client
        self.registry = registry
        self.threshold = failure_threshold
        self.window = window
        self.backoff = backoff
        self.probe_interval = probe_interval
        self.clock = clock
        self.failures_key = upstream_key(registry, "failures")
        self.breaker_key = upstream_key(registry, "breaker")
        self.probe_key = upstream_key(registry, "probe")
        self.ratelimit_key = upstream_key(registry, "ratelimit")

    def open_state(self) -> tuple[dict, float] | None:
        """(what opened the breaker, seconds until it closes) while it is open, else None."""
        try:
            pipe = self.redis.pipeline()
            pipe.get(self.breaker_key)
            pipe.pttl(self.breaker_key)
            value, pttl = pipe.execute()
        except RedisError:
            return None
        if value is None:
            return None
        return _breaker_json(value), max(pttl, 0) / 1000

    def take_probe(self) -> bool:
        """True for the one call in each probe_interval that may ask an upstream whose
        breaker is open (from every process and node together)."""
        try:
            return bool(
                self.redis.set(
                    self.probe_key, "1", nx=True, px=max(1, int(self.probe_interval * 1000))
                )
            )
        except RedisError:
            return False

    def probe_wait(self) -> float:
        """Seconds until the next probe may go out."""
        try:
            pttl = self.redis.pttl(self.probe_key)
        except RedisError:
            return self.probe_interval
        return max(pttl, 0) / 1000 if pttl and pttl > 0 else self.probe_interval

    def failed(self, reason: str) -> None:
        with contextlib.suppress(RedisError):
            pipe = self.redis.pipeline()
            pipe.incr(self.failures_key)
            pipe.expire(self.failures_key, int(self.window), nx=True)
            count, _ = pipe.execute()
            if count >= self.threshold:
                self._open({"status": 503, "reason": reason}, self.backoff)

    def rate_limited(self, retry_after: float | None) -> None:
        wait = retry_after if retry_after and retry_after > 0 else self.backoff
        wait = min(wait, self.max_retry_after)
        with contextlib.suppress(RedisError):
            self._open({"status": 429, "reason": "rate-limited (429)"}, wait)

    def _open(self, state: dict, seconds: float) -> None:
        state["since"] = round(self.clock(), 3)
        pipe = self.redis.pipeline()
        pipe.set(self.breaker_key, json.dumps(state), px=max(1, int(seconds * 1000)))
        # Keep the count one short of the threshold past the back-off: a failed probe reopens.
        pipe.set(self.failures_key, self.threshold - 1, ex=int(seconds + self.window) + 1)
        # The first probe goes one interval after the breaker opened (or after the failed
        # probe that reopened it), not at once.
        pipe.set(self.probe_key, "1", px=max(1, int(self.probe_interval * 1000)))
        pipe.execute()

    def succeeded(self) -> None:
        # An answer closes the breaker: this may have been the probe of an open one, and
        # nothing after the upstream's return should wait out the back-off. Not after a 429:
        # rate_limited() opened that one, and no probe is sent while it is open.
        with contextlib.suppress(RedisError):
            pipe = self.redis.pipeline()
            pipe.delete(self.failures_key)
            pipe.get(self.breaker_key)
            _, breaker = pipe.execute()
            if breaker is not None and _breaker_json(breaker).get("status") != 429:
                self.redis.delete(self.breaker_key)

    def record_rate_limit(self, fields: dict[str, str]) -> None:
        record: dict[FieldT, EncodableT] = dict(fields.items())
        record["updated"] = f"{self.clock():.3f}"
        with contextlib.suppress(RedisError):
            pipe = self.redis.pipeline()
            pipe.hset(self.ratelimit_key, mapping=record)
            pipe.expire(self.ratelimit_key, RATELIMIT_TTL)
            pipe.execute()
