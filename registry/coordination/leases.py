"""Leases: `pt:lease:blob:<digest>` (one fill of a blob) and `pt:lease:tag:*` (one upstream
fetch of a tag), as Redis locks that their holder renews."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable

import redis
from redis.exceptions import LockError, RedisError

from registry.coordination.keys import PREFIX, text
from registry.digests import Digest
from registry.errors import redis_unavailable

BLOB_LEASE_PREFIX = f"{PREFIX}lease:blob:"


def blob_lease_key(digest: Digest) -> str:
    return f"{BLOB_LEASE_PREFIX}{digest}"


def tag_lease_key(repository: str, tag: str) -> str:
    return f"{PREFIX}lease:tag:{repository}:{tag}"


class Lease:
    """A Redis lock with a TTL that its holder renews while it makes progress.

    Built on redis-py's Lock (atomic compare-and-extend / compare-and-delete scripts); the
    token is readable, so `redis-cli GET` shows who holds the lease.
    """

    def __init__(self, client: redis.Redis, key: str, ttl: float, owner: str) -> None:
        self.redis = client
        self.key = key
        self.ttl = ttl
        self.token = f"{owner}:{uuid.uuid4().hex[:12]}"
        # Set by keep_alive when a renewal fails: someone else may now hold the lease.
        self.lost = False
        self._lock = client.lock(key, timeout=ttl, blocking=False, thread_local=False)

    def acquire(self) -> bool:
        try:
            return bool(self._lock.acquire(token=self.token))
        except RedisError as exc:
            raise redis_unavailable(exc) from None

    def renew(self) -> bool:
        try:
            self._lock.reacquire()
            return True
        except (LockError, RedisError):
            return False

    def release(self) -> None:
        # Lapsed or Redis gone: either way nobody holds it for us any more.
        with contextlib.suppress(LockError, RedisError):
            self._lock.release()

    def holder(self) -> str | None:
        """Who holds the lease now (whoever it is), None when nobody does."""
        holder = self.redis.get(self.key)
        return text(holder) if holder is not None else None

    def wait_released(self, seconds: float, step: float = 0.05) -> None:
        """Wait (at most `seconds`) for whoever holds the lease to let it go."""
        deadline = time.monotonic() + seconds
        while self.holder() is not None and time.monotonic() < deadline:
            time.sleep(step)

    def keep_alive(
        self, alive: Callable[[], bool], renewed: Callable[[], None] = lambda: None
    ) -> threading.Thread:
        """Renew every ttl/3 while `alive()`, calling `renewed()` after each renewal; a
        failed renewal ends the keep-alive."""

        def run() -> None:
            while alive():
                time.sleep(self.ttl / 3)
                if not alive():
                    return
                if not self.renew():
                    self.lost = True
                    return
                with contextlib.suppress(redis.RedisError):
                    renewed()

        thread = threading.Thread(target=run, name=f"lease {self.key}", daemon=True)
        thread.start()
        return thread


class Leases:
    """The blob and tag leases of one process (`owner`: host and pid)."""

    def __init__(self, client: redis.Redis, ttl: float, owner: str) -> None:
        self.redis = client
        self.ttl = ttl
        self.owner = owner

    def blob(self, digest: Digest) -> Lease:
        return Lease(self.redis, blob_lease_key(digest), self.ttl, self.owner)

    def tag(self, repository: str, tag: str) -> Lease:
        return Lease(self.redis, tag_lease_key(repository, tag), self.ttl, self.owner)

    def blob_holder(self, digest: Digest) -> str | None:
        holder = self.redis.get(blob_lease_key(digest))
        return text(holder) if holder is not None else None

    def blob_held(self, digest: Digest) -> bool:
        return self.blob_holder(digest) is not None
