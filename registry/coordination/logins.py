"""What the cache's own logins share through Redis (the key schema is in
registry/coordination/__init__.py): the key its tokens are signed with (`pt:login:key`), so
that a token from one worker or node is good at every other, and each client address's
failed logins (`pt:login:failed:<address>`), so that guessing is slowed down everywhere."""

from __future__ import annotations

import secrets

import redis

PREFIX = "pt:login:"
# Failed logins of an address are counted over this window.
FAILED_WINDOW = 900


class Logins:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def signing_key(self) -> bytes:
        """The key tokens are signed with: made by the first process to ask. After a
        FLUSHALL a new one is made, and clients log in again on the 401 they get."""
        key = f"{PREFIX}key"
        self.redis.set(key, secrets.token_hex(32), nx=True)
        value = self.redis.get(key)
        assert value is not None
        return value if isinstance(value, bytes) else value.encode()

    def failed(self, address: str) -> int:
        """Count one failed login of `address`; how many it has had in the window."""
        key = f"{PREFIX}failed:{address}"
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, FAILED_WINDOW, nx=True)
        count, _ = pipe.execute()
        return int(count)

    def failures(self, address: str) -> int:
        value = self.redis.get(f"{PREFIX}failed:{address}")
        return int(value) if value else 0
