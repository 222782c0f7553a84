"""The negative cache: `pt:missing:<user>@<registry>/<repository>[:<reference>]`, what
upstream said does not exist (or is denied), so that retry storms stop here."""

from __future__ import annotations

import contextlib

import redis
from redis.exceptions import RedisError

from registry.coordination.keys import PREFIX, text


def missing_key(identity: str, repository: str, reference: str | None = None) -> str:
    return f"{PREFIX}missing:{identity}@{repository}" + (f":{reference}" if reference else "")


class NegativeCache:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def remember(self, key: str, message: str, ttl: float) -> None:
        if ttl > 0:
            with contextlib.suppress(RedisError):
                self.redis.set(key, message, px=int(ttl * 1000))

    def lookup(self, *keys: str) -> str | None:
        """The remembered message of the first of `keys` upstream said is missing."""
        try:
            values = self.redis.mget(keys)
        except RedisError:
            return None
        return next((text(v) for v in values if v is not None), None)
