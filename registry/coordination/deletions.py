"""The owner of `pt:deletions`: a token that whoever deletes from the store (the GC's sweep,
`admin evict`, `admin verify --delete`) rewrites after deleting. What a node remembers of the
store's answers (pullthrough/presence.py) holds only while the token is the one it read
before asking."""

from __future__ import annotations

import secrets

import redis
from redis.exceptions import RedisError

from registry.coordination.keys import PREFIX, text

KEY = f"{PREFIX}deletions"


class Deletions:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def happened(self) -> None:
        """Something was deleted from the store: every remembered answer is stale. A fresh
        random token, never a counter: after a FLUSHALL a counter could come back to a value
        a node remembers."""
        self.redis.set(KEY, secrets.token_hex(8))

    def token(self) -> str | None:
        """The token now ("" when none was ever written); None when Redis did not answer
        (then nothing may be reused)."""
        try:
            value = self.redis.get(KEY)
        except RedisError:
            return None
        return text(value) if value else ""
