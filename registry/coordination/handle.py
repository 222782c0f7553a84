"""One process's handle on Redis (`Coordination`: each attribute the owner of its keys)
and the Redis client of the cache (`connect`). The key schema is in
registry/coordination/__init__.py."""

from __future__ import annotations

import os
import socket
from typing import Any

import redis
from redis.sentinel import SentinelConnectionPool

from registry.config import HostsSettings, Settings
from registry.coordination.catalog import CatalogIndex
from registry.coordination.deletions import Deletions
from registry.coordination.fill_records import FillRecords
from registry.coordination.follows import Follows
from registry.coordination.gcstate import GcState, StoreTotals
from registry.coordination.hosts import Hosts
from registry.coordination.hourly import Hourly
from registry.coordination.leases import Leases
from registry.coordination.limits import Limits
from registry.coordination.logins import Logins
from registry.coordination.missing import NegativeCache
from registry.coordination.pulls import Pulls
from registry.coordination.tag_moves import TagMoves
from registry.coordination.tiers import TierNews
from registry.coordination.upstream_health import upstream_status
from registry.coordination.verdicts import Verdicts


class Coordination:
    """One process's handle on Redis: each attribute is the owner of its keys."""

    def __init__(
        self, client: redis.Redis, lease_ttl: float, *, hosts_max: int = HostsSettings.max
    ) -> None:
        self.redis = client
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.leases = Leases(client, lease_ttl, self.owner)
        self.fills = FillRecords(client)
        self.limits = Limits(client)
        self.catalog = CatalogIndex(client)
        self.missing = NegativeCache(client)
        self.pulls = Pulls(client)
        self.gc = GcState(client, self.owner)
        self.store = StoreTotals(client)
        self.verdicts = Verdicts(client)
        self.follows = Follows(client)
        self.hourly = Hourly(client, quota=lambda registry: upstream_status(client, registry))
        self.tiers = TierNews(client)
        self.deletions = Deletions(client)
        self.tag_moves = TagMoves(client)
        self.hosts = Hosts(client, hosts_max)
        self.logins = Logins(client)

    # For people: /readyz, /metrics, the UI, the admin CLI (these raise RedisError).
    def ping(self) -> None:
        self.redis.ping()

    def upstream_status(self, registry: str) -> dict:
        return upstream_status(self.redis, registry)


def connect(
    settings: Settings, *, socket_timeout: float, connect_timeout: float, **options: Any
) -> redis.Redis:
    """The Redis client of the cache: `redis.url`, or with `redis.sentinels` the master that
    the sentinels name now (the client asks them again after a failover)."""
    if not settings.redis_sentinels:
        return redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            **options,
        )
    from redis.connection import parse_url
    from redis.sentinel import Sentinel

    auth = {k: v for k, v in parse_url(settings.redis_url).items() if k in AUTH_OPTIONS}
    timeouts = {"socket_timeout": connect_timeout, "socket_connect_timeout": connect_timeout}
    sentinel = Sentinel(
        list(settings.redis_sentinels),
        # The sentinels' own connections: their password is not the data server's.
        sentinel_kwargs={**timeouts, "password": settings.redis_sentinel_password},
        **timeouts,
    )
    return sentinel.master_for(
        settings.redis_master,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        **auth,
        **options,
    )


# What redis.url still says when sentinels find the server.
AUTH_OPTIONS = ("db", "username", "password")


def redis_address(client: redis.Redis) -> str:
    """host:port (or the socket) of a client, never its password; for a client of the
    master the Sentinels name, that master and the Sentinels."""
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        sentinels = ", ".join(redis_address(s) for s in pool.sentinel_manager.sentinels)
        return f"master {pool.service_name!r} (Sentinels {sentinels})"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
