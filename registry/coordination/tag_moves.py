"""The owner of `pt:tag-moves`: a token rewritten after a tag's file comes to name another
digest or goes (a moved tag fetched, the follower, `admin evict`, the GC's sweep). A tag
record a process remembers instead of reading the bucket (pullthrough/presence.py) holds only
while the token is the one it read before reading the record."""

from __future__ import annotations

import secrets

import redis
from redis.exceptions import RedisError

from registry.coordination.keys import PREFIX, text

KEY = f"{PREFIX}tag-moves"


class TagMoves:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def happened(self) -> None:
        """A tag's file names another digest now, or is gone: every remembered record is
        stale. A random token, as pt:deletions's."""
        self.redis.set(KEY, secrets.token_hex(8))

    def token(self) -> str | None:
        """The token now ("" when none was ever written); None when Redis did not answer
        (then no record may be reused)."""
        try:
            value = self.redis.get(KEY)
        except RedisError:
            return None
        return text(value) if value else ""
