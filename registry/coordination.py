"""Coordination through Redis: every key pullthrough writes is named here.

Redis key schema (prefix `pt:`). Redis holds coordination and indexes only: `FLUSHALL` loses
no cached content, and every index is rebuilt from disk when missing.

    pt:lease:blob:<digest>      string  TTL lease_ttl (5 s), renewed every lease_ttl/3 by the
                                        holder. The fill lease of a blob; the value names the
                                        holder: `<host>:<pid>:<token>`.
    pt:fill:<digest>            hash    TTL 1 h, refreshed as the fill runs. Progress of the
                                        fill for followers in any process: owner, upstream,
                                        repository, size, written, state (starting |
                                        streaming | committed | failed), reason, phase,
                                        error_class, error_message, retry_after, updated.
    pt:lease:tag:<registry>/<repository>:<tag>
                                string  TTL lease_ttl, renewed. One upstream fetch or
                                        revalidation of a tag at a time.
    pt:repos                    zset    no TTL. Catalog index: `<registry>/<repository>`,
                                        every score 0 so ZRANGEBYLEX pages it.
    pt:repos:built              string  no TTL. Set once pt:repos was rebuilt from disk; when
                                        missing (e.g. after FLUSHALL) the next catalog
                                        request rebuilds the index.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable

import redis
from redis.exceptions import LockError, RedisError

from registry.digests import Digest
from registry.errors import CacheUnavailable

PREFIX = "pt:"
FILL_RECORD_TTL = 3600
REPOS_KEY = f"{PREFIX}repos"
REPOS_BUILT_KEY = f"{PREFIX}repos:built"


def blob_lease_key(digest: Digest) -> str:
    return f"{PREFIX}lease:blob:{digest}"


def fill_key(digest: Digest) -> str:
    return f"{PREFIX}fill:{digest}"


def tag_lease_key(repository: str, tag: str) -> str:
    return f"{PREFIX}lease:tag:{repository}:{tag}"


class Lease:
    """A Redis lock with a TTL that its holder renews while it makes progress.

    Built on redis-py's Lock (atomic compare-and-extend / compare-and-delete scripts); the
    token is readable, so `redis-cli GET` shows who holds the lease.
    """

    def __init__(self, client: redis.Redis, key: str, ttl: float, owner: str) -> None:
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
            raise CacheUnavailable(
                f"Redis is unreachable, cannot coordinate a fill ({exc})"
            ) from None

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

    def keep_alive(self, alive: Callable[[], bool]) -> threading.Thread:
        """Renew every ttl/3 while `alive()`; a failed renewal ends the keep-alive."""

        def run() -> None:
            while alive():
                time.sleep(self.ttl / 3)
                if alive() and not self.renew():
                    self.lost = True
                    return

        thread = threading.Thread(target=run, name=f"lease {self.key}", daemon=True)
        thread.start()
        return thread


class Coordination:
    def __init__(self, client: redis.Redis, lease_ttl: float) -> None:
        self.redis = client
        self.lease_ttl = lease_ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    def blob_lease(self, digest: Digest) -> Lease:
        return Lease(self.redis, blob_lease_key(digest), self.lease_ttl, self.owner)

    def tag_lease(self, repository: str, tag: str) -> Lease:
        return Lease(self.redis, tag_lease_key(repository, tag), self.lease_ttl, self.owner)

    def lease_holder(self, key: str) -> str | None:
        holder = self.redis.get(key)
        return holder.decode() if holder is not None else None

    def lease_held(self, key: str) -> bool:
        return self.lease_holder(key) is not None

    # -- fill progress -------------------------------------------------------------------------
    def fill_state(self, digest: Digest) -> dict[str, str]:
        raw = self.redis.hgetall(fill_key(digest))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def update_fill(self, digest: Digest, **fields: object) -> None:
        key = fill_key(digest)
        mapping = {k: str(v) for k, v in fields.items()}
        mapping["updated"] = f"{time.time():.3f}"
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, FILL_RECORD_TTL)
        pipe.execute()

    def reset_fill(self, digest: Digest, **fields: object) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(fill_key(digest))
        pipe.hset(fill_key(digest), mapping={k: str(v) for k, v in fields.items()})
        pipe.expire(fill_key(digest), FILL_RECORD_TTL)
        pipe.execute()

    # -- catalog index ---------------------------------------------------------------------------
    def index_repository(self, name: str) -> None:
        # The index is rebuilt from disk: a missed entry is not lost content.
        with contextlib.suppress(RedisError):
            self.redis.zadd(REPOS_KEY, {name: 0})

    def catalog(
        self, n: int | None, last: str | None, rebuild: Callable[[], Iterable[str]]
    ) -> list[str]:
        if not self.redis.exists(REPOS_BUILT_KEY):
            names = sorted(set(rebuild()))
            pipe = self.redis.pipeline()
            if names:
                pipe.zadd(REPOS_KEY, dict.fromkeys(names, 0))
            pipe.set(REPOS_BUILT_KEY, "1")
            pipe.execute()
        start = f"({last}" if last else "-"
        if n is None:
            return [m.decode() for m in self.redis.zrangebylex(REPOS_KEY, start, "+")]
        return [m.decode() for m in self.redis.zrangebylex(REPOS_KEY, start, "+", 0, n)]
