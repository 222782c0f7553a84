"""Upstream bearer tokens shared by every process through Redis (`pt:token:<sha256>`; the key
schema is in registry/coordination/__init__.py), beside the client that fetches them."""

from __future__ import annotations

import contextlib
import hashlib

import redis
from redis.exceptions import RedisError

from registry.upstream.auth import TokenCache, token_lifetime

PREFIX = "pt:"


class SharedTokenCache:
    """Upstream bearer tokens in Redis, so N workers fetch one token per scope, not N; a
    per-process copy in front saves the round trip, and serves alone when Redis is down."""

    def __init__(self, client: redis.Redis, local: TokenCache | None = None) -> None:
        self.redis = client
        self.local = local or TokenCache()

    @staticmethod
    def _key(key: tuple[str, ...]) -> str:
        return f"{PREFIX}token:" + hashlib.sha256("\0".join(key).encode()).hexdigest()

    def get(self, key: tuple[str, ...]) -> str | None:
        token = self.local.get(key)
        if token is not None:
            return token
        try:
            pipe = self.redis.pipeline()
            pipe.get(self._key(key))
            pipe.pttl(self._key(key))
            value, pttl = pipe.execute()
        except RedisError:
            return None
        if value is None or pttl <= 0:
            return None
        self.local.put_for(key, value.decode(), pttl / 1000)
        return value.decode()

    def put(self, key: tuple[str, ...], token: str, expires_in: float) -> None:
        lifetime = token_lifetime(expires_in)
        self.local.put_for(key, token, lifetime)
        with contextlib.suppress(RedisError):
            self.redis.set(self._key(key), token, px=max(1, int(lifetime * 1000)))
