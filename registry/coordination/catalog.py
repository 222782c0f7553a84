"""The catalog index: `pt:repos` (every repository, paged with ZRANGEBYLEX) and
`pt:repos:built` (set once the index was rebuilt from the store)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import redis
from redis.exceptions import RedisError

from registry.coordination.keys import PREFIX, text

REPOS_KEY = f"{PREFIX}repos"
REPOS_BUILT_KEY = f"{PREFIX}repos:built"


class CatalogIndex:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def add(self, name: str) -> None:
        # The index is rebuilt from disk: a missed entry is not lost content.
        with contextlib.suppress(RedisError):
            self.redis.zadd(REPOS_KEY, {name: 0})

    def remove(self, names: list[str]) -> None:
        if names:
            with contextlib.suppress(RedisError):
                self.redis.zrem(REPOS_KEY, *names)

    def forget(self) -> None:
        """The next catalog request rebuilds pt:repos from the store."""
        self.redis.delete(REPOS_BUILT_KEY)

    def page(
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
            return [text(m) for m in self.redis.zrangebylex(REPOS_KEY, start, "+")]
        return [text(m) for m in self.redis.zrangebylex(REPOS_KEY, start, "+", 0, n)]
