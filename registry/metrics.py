"""Prometheus metrics: what pullthrough counts, and the `/metrics` endpoint.

Under gunicorn every worker writes its counters to files in `PROMETHEUS_MULTIPROC_DIR`
(emptied at start, dead workers marked: deploy/gunicorn.conf.py), and a scrape of any worker
sums all of them. State that lives in Redis (upstream quota and breaker, storage totals, GC
runs) is read from Redis at scrape time, so it is the same whichever worker answers.

Counters (all with the `pullthrough_` prefix; README lists them with their labels):
    cache_requests_total{kind, registry, result}   result: hit | miss | revalidated | stale
    served_bytes_total{kind, registry, source}     source: cache | upstream
    blob_transfer_seconds{source}                  histogram, measured where the bytes flow
    upstream_requests_total{registry, method, status}   status: HTTP code or "error"
    upstream_bytes_total{registry}                 blob bytes fetched from upstream
    fills_total{registry, role}                    role: fetcher (started) | follower (joined)
    fill_failures_total{registry, reason}          digest_mismatch | upstream_error | timeout |
                                                   storage_error | coordination_error
    manifest_seconds{method, result}               histogram of manifest answers (the route
                                                   prometheus-flask-exporter does not time)
    client_pulls_total{engine}                     pulls (manifest requests by tag) by
                                                   the client's engine (registry/clients.py)
    client_bytes_total{engine}                     bytes that left for clients, by engine
    local_tier_hits_total                          blob requests served from the node's copy
    local_tier_copied_bytes_total                  bytes copied into the node's tier
    local_tier_evictions_total                     copies evicted past local_cache.max_size
    s3_blob_reads_total{for}                       blobs read from the bucket: local_tier (a
                                                   node's copy into its tier, of a committed
                                                   blob or a fill) | client (one client's GET)
Gauges read at scrape time: hosts_seen{period="1d"} (client addresses, from Redis),
local_tier_bytes, local_tier_max_bytes, local_tier_blobs (the
node's local tier, of whichever worker answers: they share the disk).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from redis.exceptions import RedisError

from registry.coordination import Coordination

if TYPE_CHECKING:
    from registry.store.tier import LocalTier

TRANSFER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MANIFEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


_pid = [0]


def _cached_pid() -> int:
    return _pid[0]


def cheap_multiprocess_values() -> None:
    """prometheus_client's multiprocess values ask the kernel for the process id on every
    inc() (to notice a fork); the id is kept here instead, and renewed in a forked child.
    Before any metric is made (create_app)."""
    from prometheus_client import values

    if _pid[0] == 0:
        _pid[0] = os.getpid()
        os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))
    values.ValueClass = values.MultiProcessValue(process_identifier=_cached_pid)


class Metrics:
    """The counters of one process. Unregistered under gunicorn (the multiprocess files are
    what a scrape reads); registered in `registry` otherwise."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        reg = None if multiprocess() else registry
        if reg is None:
            cheap_multiprocess_values()
        self.cache_requests = Counter(
            "pullthrough_cache_requests",
            "Manifest and blob requests by how the cache answered them.",
            ["kind", "registry", "result"],
            registry=reg,
        )
        self.served_bytes = Counter(
            "pullthrough_served_bytes",
            "Bytes sent to clients, from the cache or streamed from an upstream fill.",
            ["kind", "registry", "source"],
            registry=reg,
        )
        self.blob_seconds = Histogram(
            "pullthrough_blob_transfer_seconds",
            "Time to send a blob response, first byte of the request to the last byte sent.",
            ["source"],
            buckets=TRANSFER_BUCKETS,
            registry=reg,
        )
        self.upstream_requests = Counter(
            "pullthrough_upstream_requests",
            "Requests sent to upstream registries and their token services.",
            ["registry", "method", "status"],
            registry=reg,
        )
        self.upstream_bytes = Counter(
            "pullthrough_upstream_bytes",
            "Blob bytes fetched from upstream registries.",
            ["registry"],
            registry=reg,
        )
        self.fills = Counter(
            "pullthrough_fills",
            "Blob misses: fills started (fetcher) and requests that joined one (follower).",
            ["registry", "role"],
            registry=reg,
        )
        self.signature_checks = Counter(
            "pullthrough_signature_checks",
            "cosign signature checks of manifests a verify policy covers, by what they found "
            "(signed, unsigned, mismatch, unknown_key).",
            ["registry", "result"],
            registry=reg,
        )
        self.refused = Counter(
            "pullthrough_refused_requests",
            "Requests the auth: section refused, by why (login, password, token, access, locked).",
            ["reason"],
            registry=reg,
        )
        self.fill_failures = Counter(
            "pullthrough_fill_failures",
            "Blob fills that failed, by reason.",
            ["registry", "reason"],
            registry=reg,
        )

        self.tier_hits = Counter(
            "pullthrough_local_tier_hits",
            "Blob requests served from the node's verified local copy (storage.s3.local_cache).",
            registry=reg,
        )
        self.tier_copied_bytes = Counter(
            "pullthrough_local_tier_copied_bytes",
            "Bytes copied from the bucket into the node's local tier.",
            registry=reg,
        )
        self.tier_evictions = Counter(
            "pullthrough_local_tier_evictions",
            "Local copies evicted (least recently served first) past local_cache.max_size.",
            registry=reg,
        )
        self.s3_blob_reads = Counter(
            "pullthrough_s3_blob_reads",
            "Blobs read from the bucket, by what for (local_tier: a node's one copy into its "
            "tier, of a committed blob or of a fill; client: one client's GET of a committed "
            "blob).",
            ["for"],
            registry=reg,
        )

        # The manifest route is the hottest there is: timed here with children bound once,
        # not by prometheus-flask-exporter's per-request label building (app.py).
        self.manifest_seconds = Histogram(
            "pullthrough_manifest_seconds",
            "Time to answer a manifest request, by method and how the cache answered.",
            ["method", "result"],
            buckets=MANIFEST_BUCKETS,
            registry=reg,
        )
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.client_pulls = Counter(
            "pullthrough_client_pulls",
            "Pulls (manifest requests by tag) by the engine of the client that made them.",
            ["engine"],
            registry=reg,
        )
        self.client_bytes = Counter(
            "pullthrough_client_bytes",
            "Bytes sent to clients (those that left, of a download cut short too), by engine.",
            ["engine"],
            registry=reg,
        )

    def manifest_answered(self, method: str, result: str, seconds: float) -> None:
        self.bound(self.manifest_seconds, method, result).observe(seconds)

    def bound(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, made once per process: the hot routes' metrics are
        recorded without building labels per request."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def client_sent(self, engine: str, pulls: int, size: int) -> None:
        if pulls:
            self.bound(self.client_pulls, engine).inc(pulls)
        if size:
            self.bound(self.client_bytes, engine).inc(size)

    def blob_sent(self, registry: str, source: str, size: int, seconds: float) -> None:
        self.served_bytes.labels("blob", registry, source).inc(size)
        self.blob_seconds.labels(source).observe(seconds)


class RedisState:
    """A collector of what lives in Redis: quota, breaker, storage totals, GC runs."""

    def __init__(self, coord: Coordination, registries: list[str]) -> None:
        self.coord = coord
        self.registries = registries

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("pullthrough_redis_up", "Whether Redis answered this scrape.")
        try:
            families = list(self._families())
        except RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        limit = GaugeMetricFamily(
            "pullthrough_upstream_ratelimit_limit",
            "Pull quota upstream announced (ratelimit-limit).",
            labels=["registry", "window_seconds"],
        )
        remaining = GaugeMetricFamily(
            "pullthrough_upstream_ratelimit_remaining",
            "Pulls left in the quota window (ratelimit-remaining).",
            labels=["registry", "window_seconds"],
        )
        breaker = GaugeMetricFamily(
            "pullthrough_upstream_breaker_open",
            "1 while the circuit breaker keeps requests away from the upstream.",
            labels=["registry"],
        )
        for name in self.registries:
            status = self.coord.upstream_status(name)
            window = status.get("window", "")
            if status.get("limit", "").isdigit():
                limit.add_metric([name, window], float(status["limit"]))
            if status.get("remaining", "").isdigit():
                remaining.add_metric([name, window], float(status["remaining"]))
            breaker.add_metric([name], 0.0 if status["breaker"] is None else 1.0)
        yield from (limit, remaining, breaker)

        store = self.coord.store.read()
        if store:
            size = GaugeMetricFamily(
                "pullthrough_storage_bytes", "Bytes of committed content in the store."
            )
            size.add_metric([], float(store.get("bytes", 0)))
            count = GaugeMetricFamily("pullthrough_storage_blobs", "Committed blobs in the store.")
            count.add_metric([], float(store.get("blobs", 0)))
            yield from (size, count)

        totals = self.coord.gc.totals()
        runs = CounterMetricFamily("pullthrough_gc_runs", "GC sweeps run (dry runs excluded).")
        runs.add_metric([], float(totals.get("runs", 0)))
        freed = CounterMetricFamily("pullthrough_gc_freed_bytes", "Bytes the GC has freed.")
        freed.add_metric([], float(totals.get("freed_bytes", 0)))
        yield from (runs, freed)
        last = self.coord.gc.last()
        if last.get("finished"):
            when = GaugeMetricFamily(
                "pullthrough_gc_last_run_timestamp_seconds", "When the last GC run finished."
            )
            when.add_metric([], float(last["finished"]))
            seconds = GaugeMetricFamily(
                "pullthrough_gc_last_run_duration_seconds", "How long the last GC run took."
            )
            seconds.add_metric([], float(last.get("seconds") or 0))
            yield from (when, seconds)

        saved = GaugeMetricFamily(
            "pullthrough_upstream_pulls_saved",
            "Manifest GETs answered without an upstream GET (what Docker Hub's quota counts), "
            "today (UTC) and over the last 7 days.",
            labels=["registry", "period"],
        )
        now = time.time()
        for name in self.registries:
            week = self.coord.hourly.week(name, now)
            saved.add_metric([name, "today"], float(week.saved_today))
            saved.add_metric([name, "7d"], float(week.saved))
        yield saved

        # The follower runs in the worker, not here: its counts come through Redis.
        requests = CounterMetricFamily(
            "pullthrough_follow_upstream_requests",
            "Upstream requests the follower made (apart from client-driven ones): head, "
            "manifest, blob, tags.",
            labels=["registry", "kind"],
        )
        checks = CounterMetricFamily(
            "pullthrough_follow_checks",
            "Checks of followed tags, by what they found.",
            labels=["registry", "state"],
        )
        fetched = CounterMetricFamily(
            "pullthrough_follow_fetched_bytes",
            "Blob bytes the follower fetched before anyone asked.",
            labels=["registry"],
        )
        for (registry, what), value in sorted(self.coord.follows.totals().items()):
            if what == "bytes":
                fetched.add_metric([registry], float(value))
            elif what.startswith("check_"):
                checks.add_metric([registry, what.removeprefix("check_")], float(value))
            else:
                requests.add_metric([registry, what], float(value))
        yield from (requests, checks, fetched)

        hosts = GaugeMetricFamily(
            "pullthrough_hosts_seen",
            "Client addresses that sent a request to the cache within the period.",
            labels=["period"],
        )
        seen = self.coord.hosts.addresses_seen_since(now - 86400)
        hosts.add_metric(["1d"], float(len(seen)))
        yield hosts


def _counters(local: CollectorRegistry) -> CollectorRegistry:
    """A fresh registry of every worker's counters (or, outside gunicorn, this process's)."""
    registry = CollectorRegistry()
    if multiprocess():
        MultiProcessCollector(registry)
    else:
        registry.register(_Forward(local))
    return registry


def totals(local: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every counter sample summed over all workers (or this process's): for the UI."""
    registry = _counters(local)
    return [
        (sample.name, sample.labels, sample.value)
        for family in registry.collect()
        for sample in family.samples
    ]


def scrape(
    coord: Coordination,
    registries: list[str],
    local: CollectorRegistry,
    tier: LocalTier | None = None,
) -> bytes:
    """The text exposition: every worker's counters (or this process's), plus Redis state
    and the node's local tier."""
    registry = _counters(local)
    registry.register(RedisState(coord, registries))
    if tier is not None:
        registry.register(TierState(tier))
    return generate_latest(registry)


class TierState:
    """The node's local tier as it is on disk now."""

    def __init__(self, tier: LocalTier) -> None:
        self.tier = tier

    def collect(self) -> Iterator[Metric]:
        blobs, size = self.tier.usage()
        for name, doc, value in (
            ("pullthrough_local_tier_bytes", "Bytes of verified copies in the local tier.", size),
            (
                "pullthrough_local_tier_max_bytes",
                "storage.s3.local_cache.max_size.",
                self.tier.max_size,
            ),
            ("pullthrough_local_tier_blobs", "Verified copies in the local tier.", blobs),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], float(value))
            yield gauge


class _Forward:
    """Exposes another registry's metrics inside a fresh one (single-process mode)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from self.source.collect()
