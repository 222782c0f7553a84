"""The table of clients that pull through the cache (the Hosts page): `pt:hosts`,
`pt:host:<engine>@<address>` and `pt:hosts:tls:<outcome>:<address>`.

A client is an address and the engine it pulls with (one host running Docker and podman is
two rows). What each request got is counted in the process and written every FLUSH_EVERY
seconds (no Redis round trip per request); the table keeps at most `hosts.max` clients, the
least recently seen dropped first. These are observations, not an index: Redis losing them
loses the history, nothing else."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import redis
from redis.exceptions import RedisError

from registry.coordination.batches import Flusher
from registry.coordination.keys import PREFIX, text

FLUSH_EVERY = 1.0
TABLE = f"{PREFIX}hosts"
# The counters of a client's row.
COUNTS = ("requests", "pulls", "bytes", "hits", "answered")


def host_key(client: str) -> str:
    return f"{PREFIX}host:{client}"


def client_id(engine: str, address: str) -> str:
    return f"{engine}@{address}"


@dataclass
class Tally:
    """What one client got in this process since the last flush."""

    address: str
    engine: str
    version: str
    agent: str
    route: str | None = None
    first: float = 0.0
    last: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    error: tuple[int, str, float] | None = None  # status, cause, when
    user: str | None = None  # its login or client certificate's name, when it showed one


@dataclass(frozen=True)
class HostRow:
    """One client as the table holds it."""

    address: str
    engine: str
    version: str
    agent: str
    route: str
    first_seen: float
    last_seen: float
    requests: int
    pulls: int
    bytes: int
    hits: int
    answered: int  # manifest and blob requests answered with content (hit ratio's base)
    error_status: int | None
    error_cause: str
    error_at: float | None
    user: str = ""  # the last login or client certificate's name it showed

    @property
    def hit_ratio(self) -> float | None:
        return self.hits / self.answered if self.answered else None


class Hosts:
    def __init__(self, client: redis.Redis, max_clients: int) -> None:
        self.redis = client
        self.max_clients = max_clients
        self._pending: dict[str, Tally] = {}
        self._lock = threading.Lock()
        self._flusher = Flusher(
            self.flush, lambda: bool(self._pending), self._lock, FLUSH_EVERY, "hosts"
        )

    def note(
        self,
        address: str,
        engine: str,
        version: str,
        agent: str,
        route: str | None,
        counts: dict[str, int],
        error: tuple[int, str] | None = None,
        user: str | None = None,
    ) -> None:
        """One request of a client: its route (None: the request named none), what to add
        to its counters, the error it got (status, cause) and the user it showed."""
        key = client_id(engine, address)
        now = time.time()
        with self._lock:
            tally = self._pending.get(key)
            if tally is None:
                if len(self._pending) >= self.max_clients:
                    return  # more clients in one interval than the table keeps
                tally = self._pending[key] = Tally(address, engine, version, agent, first=now)
            tally.version, tally.agent, tally.last = version, agent, now
            if route is not None:
                tally.route = route
            for name, count in counts.items():
                tally.counts[name] += count
            if error is not None:
                tally.error = (error[0], error[1], now)
            if user:
                tally.user = user
            self._flusher.wake()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        with contextlib.suppress(RedisError):  # lost counts are lost figures, not content
            pipe = self.redis.pipeline(transaction=False)
            for key, tally in pending.items():
                row = host_key(key)
                pipe.hsetnx(row, "first_seen", tally.first)
                fields: dict = {
                    "address": tally.address,
                    "engine": tally.engine,
                    "version": tally.version,
                    "agent": tally.agent,
                    "last_seen": tally.last,
                }
                if tally.route is not None:
                    fields["route"] = tally.route
                if tally.user is not None:
                    fields["user"] = tally.user
                if tally.error is not None:
                    status, cause, when = tally.error
                    fields.update(error_status=status, error_cause=cause, error_at=when)
                pipe.hset(row, mapping=fields)
                for name, count in tally.counts.items():
                    if count:
                        pipe.hincrby(row, name, count)
                pipe.zadd(TABLE, {key: tally.last}, gt=True)
            pipe.execute()
            self._trim()

    def _trim(self) -> None:
        excess = self.redis.zcard(TABLE) - self.max_clients
        if excess <= 0:
            return
        oldest = [text(m) for m in self.redis.zrange(TABLE, 0, excess - 1)]
        pipe = self.redis.pipeline(transaction=False)
        for key in oldest:
            pipe.delete(host_key(key))
        pipe.zrem(TABLE, *oldest)
        pipe.execute()

    def rows(self) -> list[HostRow]:
        """Every client in the table, the most recently seen first."""
        keys = [text(m) for m in self.redis.zrevrange(TABLE, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(host_key(key))
        out = []
        for raw in pipe.execute():
            if raw:
                out.append(_row({k.decode(): v.decode(errors="replace") for k, v in raw.items()}))
        return out

    def addresses_seen_since(self, since: float) -> set[str]:
        """The addresses of the clients seen at `since` or later."""
        members = self.redis.zrangebyscore(TABLE, since, "+inf")
        return {text(m).partition("@")[2] for m in members}

    def first_time_said(self, outcome: str, address: str, every: float) -> bool:
        """True the first time in `every` seconds that `outcome` is said of `address` (by
        any worker or node): a log line about a client, once per client per hour."""
        key = f"{PREFIX}hosts:tls:{outcome}:{address}"
        return bool(self.redis.set(key, 1, nx=True, ex=max(1, int(every))))


def _number(raw: dict[str, str], name: str) -> int:
    try:
        return int(raw.get(name, 0))
    except ValueError:
        return 0


def _when(raw: dict[str, str], name: str) -> float | None:
    try:
        return float(raw[name])
    except (KeyError, ValueError):
        return None


def _row(raw: dict[str, str]) -> HostRow:
    status = _number(raw, "error_status") or None
    return HostRow(
        address=raw.get("address", "?"),
        engine=raw.get("engine", "other"),
        version=raw.get("version", ""),
        agent=raw.get("agent", ""),
        route=raw.get("route", ""),
        first_seen=_when(raw, "first_seen") or 0.0,
        last_seen=_when(raw, "last_seen") or 0.0,
        requests=_number(raw, "requests"),
        pulls=_number(raw, "pulls"),
        bytes=_number(raw, "bytes"),
        hits=_number(raw, "hits"),
        answered=_number(raw, "answered"),
        error_status=status,
        error_cause=raw.get("error_cause", "") if status else "",
        error_at=_when(raw, "error_at") if status else None,
        user=raw.get("user", ""),
    )
