"""Coordination through Redis: every key pullthrough writes is named here.

Redis key schema (prefix `pt:`), the one place it is written down. Redis holds coordination
and indexes only: `FLUSHALL` loses no cached content, and every index is rebuilt from disk
when missing. Each key has one owner module that alone reads and writes it: this module,
but `pt:fill:*` (registry/fills.py), `pt:token:*` (registry/upstream/tokens.py) and
`pt:upstream:*` (registry/upstream/health.py).

    pt:lease:blob:<digest>      string  TTL lease_ttl (5 s), renewed every lease_ttl/3 by the
                                        holder. The fill lease of a blob; the value names the
                                        holder: `<host>:<pid>:<token>`.
    pt:fill:<digest>            hash    TTL 1 h, refreshed as the fill runs (2 min once failed:
                                        only its waiting clients need it). Owned by
                                        registry/fills.py (FillRecord, FillState and its
                                        transitions). Progress of the
                                        fill for followers in any process: owner, upstream,
                                        repository, size, written, stored (bytes other
                                        processes can read: on S3, the stored pieces),
                                        state (starting | streaming | committing |
                                        committed | failed),
                                        reason, phase, error_class, error_message,
                                        error_reason (the status line's cause),
                                        retry_after, updated.
    pt:fills                    zset    no TTL. The fills running, `<client>|<digest>` (client:
                                        the address whose request started it, `-` for a
                                        takeover); limits.max_fills and max_fills_per_client
                                        count it. A member whose blob lease lapsed is dropped
                                        at the next admission.
    pt:budget:<client>:<minute> string  TTL 120 s. Upstream-reaching requests of one client
                                        address in one minute (limits.client_upstream_per_minute).
    pt:lease:tag:<registry>/<repository>:<tag>
                                string  TTL lease_ttl, renewed. One upstream fetch or
                                        revalidation of a tag at a time.
    pt:repos                    zset    no TTL. Catalog index: `<registry>/<repository>`,
                                        every score 0 so ZRANGEBYLEX pages it.
    pt:repos:built              string  no TTL. Set once pt:repos was rebuilt from disk; when
                                        missing (e.g. after FLUSHALL) the next catalog
                                        request rebuilds the index.
    pt:token:<sha256>           string  TTL: the token's lifetime less a margin. An upstream
                                        bearer token shared by every worker; the name hashes
                                        (upstream URL, scope, username). Keep Redis private.
    pt:upstream:<registry>:failures
                                string  TTL breaker_window. Upstream failures (refused,
                                        timeout, reset, 5xx) counted towards the breaker;
                                        deleted by any good answer.
    pt:upstream:<registry>:breaker
                                string  TTL breaker_backoff, or a 429's Retry-After. While it
                                        exists only probes call that upstream (none while a
                                        429 opened it); JSON {status, reason, since}.
    pt:upstream:<registry>:probe
                                string  TTL breaker_probe_interval. Taken (SET NX) by the one
                                        request that may probe an upstream whose breaker is
                                        open; a probe that gets an answer closes the breaker.
    pt:upstream:<registry>:ratelimit
                                hash    TTL 24 h. The last rate-limit headers upstream sent:
                                        limit, remaining, window (s), source, updated.
    pt:missing:<user>@<registry>/<repository>[:<reference>]
                                string  TTL negative_ttl. Upstream said this repository (or
                                        tag/digest) does not exist or is denied to <user> (the
                                        configured upstream account, empty when anonymous);
                                        the value is `<unknown|denied>:<unix s>:<message>`.
                                        Retry storms stop here.
    pt:pulled                   zset    no TTL. Last pull time (score, unix s) of every tag,
                                        `<registry>/<repository>:<tag>`, and manifest pulled by
                                        digest, `<registry>/<repository>@<digest>`. A member's
                                        first pull in a minute is written at once, later ones
                                        within 2 s (each process gathers them). Lost after
                                        FLUSHALL: the GC then counts unknown members as pulled
                                        now, so nothing is evicted for lack of history.
    pt:gc:lock                  string  TTL 10 s, renewed. Held by the one sweep running; the
                                        value names its holder.
    pt:gc:live                  set     TTL 1 h; deleted when a sweep ends. Digests that pulls
                                        referenced while a sweep ran: the sweep spares them.
    pt:gc:last                  hash    no TTL. The last sweep's report: started, finished,
                                        seconds, dry_run, repositories, manifests, blobs,
                                        store_bytes, marked_blobs, deleted_tags,
                                        deleted_manifests, deleted_links, deleted_blobs,
                                        deleted_uploads, freed_bytes, skipped_in_use, evicted,
                                        error.
    pt:gc:history               list    no TTL, newest first, 50 kept. JSON of each report.
    pt:gc:totals                hash    no TTL. Across all sweeps (dry runs excluded): runs,
                                        freed_bytes. Added to by every sweep's record_gc.
                                        Read by /metrics.
    pt:store                    hash    no TTL. bytes, blobs: the store's committed content.
                                        Set exactly by each GC sweep from its walk of the
                                        store (and by `rebuild-index`), lowered by what the
                                        sweep deletes, counted up by fills and new manifests
                                        in between (only once a walk has set it). Read by
                                        /metrics and the UI.
    pt:pulls                    hash    no TTL. Pull count per `<registry>/<repository>:<tag>`
                                        (and `@<digest>`), added up in each process and written
                                        with pt:pulled.
    pt:gc:scheduled             string  TTL 0.9 x gc.interval. Taken (SET NX) by the scheduler
                                        that enqueues this interval's sweep, so several
                                        schedulers enqueue it once.
    rq:*                                rq's own keys for the `pullthrough` queue and worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis
from redis.exceptions import LockError, RedisError

from registry.config import Settings
from registry.digests import Digest
from registry.errors import redis_unavailable
from registry.fills import FillRecord, FillRecords
from registry.upstream.health import upstream_status

PREFIX = "pt:"
FILLS_KEY = f"{PREFIX}fills"
REPOS_KEY = f"{PREFIX}repos"
REPOS_BUILT_KEY = f"{PREFIX}repos:built"
PULLED_KEY = f"{PREFIX}pulled"
GC_LOCK_KEY = f"{PREFIX}gc:lock"
GC_LIVE_KEY = f"{PREFIX}gc:live"
GC_LAST_KEY = f"{PREFIX}gc:last"
GC_HISTORY_KEY = f"{PREFIX}gc:history"
GC_SLOT_KEY = f"{PREFIX}gc:scheduled"
GC_TOTALS_KEY = f"{PREFIX}gc:totals"
STORE_KEY = f"{PREFIX}store"
PULLS_KEY = f"{PREFIX}pulls"
GC_LOCK_TTL = 10.0
# A member's first pull in this long is written at once; later ones are gathered and
# written by a background flush every PULLS_FLUSH_EVERY (pulls are hot paths).
PULLED_EVERY = 60.0
PULLS_FLUSH_EVERY = 2.0


# Admission of a fill (admit_fill), atomic across processes and nodes. Members of the zset
# are `<client>|<digest>`; one whose blob lease has lapsed is dropped (its fetcher died).
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


def blob_lease_key(digest: Digest) -> str:
    return f"{PREFIX}lease:blob:{digest}"


def tag_lease_key(repository: str, tag: str) -> str:
    return f"{PREFIX}lease:tag:{repository}:{tag}"


def missing_key(identity: str, repository: str, reference: str | None = None) -> str:
    return f"{PREFIX}missing:{identity}@{repository}" + (f":{reference}" if reference else "")


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
        self._pulled_written: dict[str, float] = {}
        self._pulls_pending: dict[str, int] = {}
        self._pulled_last: dict[str, float] = {}
        self._pulls_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        # Only a total that a walk of the store set is counted on: after FLUSHALL, counting
        # from zero would show a part of the store as the whole.
        self.fills = FillRecords(client)
        self._admit_fill = client.register_script(ADMIT_FILL)
        self._count_stored = client.register_script(
            "if redis.call('EXISTS', KEYS[1]) == 1 then "
            "redis.call('HINCRBY', KEYS[1], 'bytes', ARGV[1]); "
            "redis.call('HINCRBY', KEYS[1], 'blobs', ARGV[2]) end"
        )

    def blob_lease(self, digest: Digest) -> Lease:
        return Lease(self.redis, blob_lease_key(digest), self.lease_ttl, self.owner)

    def tag_lease(self, repository: str, tag: str) -> Lease:
        return Lease(self.redis, tag_lease_key(repository, tag), self.lease_ttl, self.owner)

    def lease_holder(self, key: str) -> str | None:
        holder = self.redis.get(key)
        return holder.decode() if holder is not None else None

    def lease_held(self, key: str) -> bool:
        return self.lease_holder(key) is not None

    # -- fill progress (registry/fills.py owns pt:fill:<digest>) ---------------------------
    def fill_state(self, digest: Digest) -> FillRecord:
        return self.fills.read(digest)

    # -- limits ----------------------------------------------------------------------------------
    def admit_fill(
        self, digest: Digest, client: str | None, max_fills: int, max_per_client: int
    ) -> str | None:
        """Count a fill that is about to start (its lease is held): None when admitted, else
        why not. Fills whose lease has lapsed (a dead fetcher) stop counting."""
        refused = self._admit_fill(
            keys=[FILLS_KEY],
            args=[f"{client or '-'}|{digest}", client or "-", max_fills, max_per_client or 0,
                  f"{PREFIX}lease:blob:"],
        )  # fmt: skip
        if refused == 1:
            return f"{max_fills} blob fills are running"
        if refused == 2:
            return f"{max_per_client} blob fills of this client are running"
        return None

    def end_fill(self, digest: Digest, client: str | None) -> None:
        with contextlib.suppress(RedisError):
            self.redis.zrem(FILLS_KEY, f"{client or '-'}|{digest}")

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

    # -- recency and the GC ----------------------------------------------------------------------
    def touch_pulled(self, member: str) -> None:
        """Count a pull and its time: a member's first pull in a minute is written at once
        (the GC may be deciding about it), later ones within PULLS_FLUSH_EVERY."""
        now = time.monotonic()
        with self._pulls_lock:
            self._pulls_pending[member] = self._pulls_pending.get(member, 0) + 1
            self._pulled_last[member] = time.time()
            if now - self._pulled_written.get(member, -PULLED_EVERY) < PULLED_EVERY:
                if self._flusher is None:
                    self._flusher = threading.Thread(
                        target=self._flush_pulls_loop, name="pulls flush", daemon=True
                    )
                    self._flusher.start()
                return
            self._pulled_written[member] = now
        self._flush_pulls([member])

    def _flush_pulls(self, members: Iterable[str] | None = None) -> None:
        with self._pulls_lock:
            chosen = list(self._pulls_pending) if members is None else list(members)
            counts = {m: self._pulls_pending.pop(m) for m in chosen if m in self._pulls_pending}
            times = {m: self._pulled_last.pop(m) for m in counts}
        if not counts:
            return
        with contextlib.suppress(RedisError):  # lost counts are lost figures, not content
            pipe = self.redis.pipeline()
            pipe.zadd(PULLED_KEY, times)
            for member, count in counts.items():
                pipe.hincrby(PULLS_KEY, member, count)
            pipe.execute()

    def _flush_pulls_loop(self) -> None:
        while True:
            time.sleep(PULLS_FLUSH_EVERY)
            self._flush_pulls()
            with self._pulls_lock:
                if not self._pulls_pending:
                    self._flusher = None  # the next gathered pull starts another
                    return

    def pull_history(self, members: list[str]) -> tuple[list[float | None], list[int]]:
        """Last pull time (None: never) and pull count of each member."""
        if not members:
            return [], []
        pipe = self.redis.pipeline()
        pipe.zmscore(PULLED_KEY, members)
        pipe.hmget(PULLS_KEY, members)
        times, counts = pipe.execute()
        return list(times), [int(c) if c else 0 for c in counts]

    def count_stored(self, size: int, blobs: int = 1) -> None:
        """Blobs were committed (or, negative, deleted): keep pt:store current between the
        walks of the store that set it exactly."""
        with contextlib.suppress(RedisError):
            self._count_stored(keys=[STORE_KEY], args=[size, blobs])

    def set_store_totals(self, size: int, blobs: int) -> None:
        """What a walk of the store measured (a sweep's start, `rebuild-index`)."""
        self.redis.hset(STORE_KEY, mapping={"bytes": size, "blobs": blobs})

    def store_totals(self) -> dict[str, int]:
        """bytes and blobs of the store's committed content; empty until first counted."""
        return _ints(self.redis.hgetall(STORE_KEY))

    def gc_totals(self) -> dict[str, int]:
        """runs and freed_bytes over every sweep (dry runs excluded)."""
        return _ints(self.redis.hgetall(GC_TOTALS_KEY))

    def pulled_times(
        self, members: list[str], default: float, record_default: bool = False
    ) -> dict[str, float]:
        """Last pull time of each member, `default` for unknown ones (also written to Redis
        when `record_default`, so the next run sees the same time)."""
        if not members:
            return {}
        scores = self.redis.zmscore(PULLED_KEY, members)
        if record_default:
            unknown = {m: default for m, s in zip(members, scores, strict=True) if s is None}
            if unknown:
                self.redis.zadd(PULLED_KEY, unknown, nx=True)
        return {m: default if s is None else s for m, s in zip(members, scores, strict=True)}

    def has_pull_history(self) -> bool:
        return bool(self.redis.exists(PULLED_KEY))

    def forget_pulled(self, members: list[str]) -> None:
        if members:
            self.redis.zrem(PULLED_KEY, *members)

    def gc_lease(self) -> Lease:
        return Lease(self.redis, GC_LOCK_KEY, GC_LOCK_TTL, self.owner)

    def note_live(self, digests: Iterable[Digest]) -> None:
        """Tell a running sweep that these digests were just referenced. Called after the
        references are on disk, so a sweep that started later sees them there anyway."""
        with contextlib.suppress(RedisError):
            if self.redis.exists(GC_LOCK_KEY):
                pipe = self.redis.pipeline()
                pipe.sadd(GC_LIVE_KEY, *[str(d) for d in digests])
                pipe.expire(GC_LIVE_KEY, 3600)
                pipe.execute()

    def is_live(self, digest: Digest) -> bool:
        return bool(self.redis.sismember(GC_LIVE_KEY, str(digest)))

    def clear_live(self) -> None:
        with contextlib.suppress(RedisError):
            self.redis.delete(GC_LIVE_KEY)

    def record_gc(self, report: dict) -> None:
        flat = {
            k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in report.items()
        }
        pipe = self.redis.pipeline()
        pipe.delete(GC_LAST_KEY)
        pipe.hset(GC_LAST_KEY, mapping=flat)
        pipe.lpush(GC_HISTORY_KEY, json.dumps(report))
        pipe.ltrim(GC_HISTORY_KEY, 0, 49)
        if not report.get("dry_run"):
            # A failed sweep counts too: it may have freed bytes before it failed.
            pipe.hincrby(GC_TOTALS_KEY, "runs", 1)
            pipe.hincrby(GC_TOTALS_KEY, "freed_bytes", int(report.get("freed_bytes") or 0))
        pipe.execute()

    def last_gc(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(GC_LAST_KEY).items()}

    def take_gc_slot(self, interval: float) -> bool:
        """True for the one scheduler that enqueues this interval's sweep."""
        return bool(
            self.redis.set(GC_SLOT_KEY, self.owner, nx=True, px=max(1000, int(interval * 900)))
        )

    def unindex_repositories(self, names: list[str]) -> None:
        if names:
            with contextlib.suppress(RedisError):
                self.redis.zrem(REPOS_KEY, *names)

    # -- negative cache --------------------------------------------------------------------------
    def remember_missing(self, key: str, message: str, ttl: float) -> None:
        if ttl > 0:
            with contextlib.suppress(RedisError):
                self.redis.set(key, message, px=int(ttl * 1000))

    def missing(self, *keys: str) -> str | None:
        """The remembered message of the first of `keys` upstream said is missing."""
        try:
            values = self.redis.mget(keys)
        except RedisError:
            return None
        return next((v.decode() for v in values if v is not None), None)

    # -- for people: /metrics, the UI, the admin CLI (raises RedisError) -----------------------
    def ping(self) -> None:
        self.redis.ping()

    def upstream_status(self, registry: str) -> dict:
        return upstream_status(self.redis, registry)

    def forget_catalog_index(self) -> None:
        """The next catalog request rebuilds pt:repos from the store."""
        self.redis.delete(REPOS_BUILT_KEY)

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


def _ints(raw: dict[bytes, bytes]) -> dict[str, int]:
    out = {}
    for key, value in raw.items():
        with contextlib.suppress(ValueError):
            out[key.decode()] = int(value)
    return out
