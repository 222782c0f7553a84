"""Limits on upstream work: `pt:fills` (the fills running, per client) and
`pt:budget:<client>:<minute>` (upstream-reaching requests of a client in a minute)."""

from __future__ import annotations

import contextlib
import ipaddress
import time

import redis
from redis.exceptions import RedisError

from registry.coordination.keys import PREFIX, text
from registry.coordination.leases import BLOB_LEASE_PREFIX
from registry.digests import Digest

FILLS_KEY = f"{PREFIX}fills"

# Admission of a fill, atomic across processes and nodes. Members of the zset are
# `<client>|<digest>`; one whose blob lease has lapsed is dropped (its fetcher died).
ADMIT_FILL = """
local total, mine = 0, 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local bar = string.find(member, '|', 1, true)
  if redis.call('EXISTS', ARGV[5] .. string.sub(member, bar + 1)) == 1 then
    total = total + 1
    if string.sub(member, 1, bar - 1) == ARGV[2] then mine = mine + 1 end
  else
    redis.call('ZREM', KEYS[1], member)
  end
end
if total >= tonumber(ARGV[3]) then return 1 end
if ARGV[2] ~= '-' and tonumber(ARGV[4]) > 0 and mine >= tonumber(ARGV[4]) then return 2 end
redis.call('ZADD', KEYS[1], 0, ARGV[1])
return 0
"""


def client_key(address: str | None) -> str | None:
    """An IPv4 address as it is; an IPv6 address as its /64 (`2001:db8:1:2::/64`)."""
    if not address or ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class Limits:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._admit_fill = client.register_script(ADMIT_FILL)

    def admit_fill(
        self, digest: Digest, client: str | None, max_fills: int, max_per_client: int
    ) -> str | None:
        """Count a fill that is about to start (its lease is held): None when admitted, else
        why not. Fills whose lease has lapsed (a dead fetcher) stop counting."""
        refused = self._admit_fill(
            keys=[FILLS_KEY],
            args=[f"{client or '-'}|{digest}", client or "-", max_fills, max_per_client or 0,
                  BLOB_LEASE_PREFIX],
        )  # fmt: skip
        if refused == 1:
            return f"{max_fills} blob fills are running"
        if refused == 2:
            return f"{max_per_client} blob fills of this client are running"
        return None

    def end_fill(self, digest: Digest, client: str | None) -> None:
        with contextlib.suppress(RedisError):
            self.redis.zrem(FILLS_KEY, f"{client or '-'}|{digest}")

    def running(self) -> list[tuple[str, str]]:
        """(client, digest) of the fills admitted and not ended (a dead fetcher's included
        until the next admission drops it)."""
        out = []
        for member in self.redis.zrange(FILLS_KEY, 0, -1):
            client, _, digest = text(member).partition("|")
            out.append((client, digest))
        return out

    def spend_upstream(self, client: str, per_minute: int) -> float | None:
        """Count one upstream-reaching request of `client`: None within its budget, else the
        seconds until the next minute (when it has budget again)."""
        now = time.time()
        minute = int(now // 60)
        key = f"{PREFIX}budget:{client}:{minute}"
        try:
            pipe = self.redis.pipeline()
            pipe.incr(key)
            pipe.expire(key, 120)
            spent, _ = pipe.execute()
        except RedisError:
            return None  # no coordination: no budget either, as with the breaker
        return None if spent <= per_minute else (minute + 1) * 60 - now
