"""`make bench`: pullthrough side by side with CNCF distribution's proxy mode, same machine, same
run, same local upstream (distribution behind a token server). Writes docs/benchmarks.md.

Scenarios:
- WAN: the upstream behind a relay that caps its bandwidth (as Docker Hub over a home link):
  one cold download, a 50-client herd on another cold blob (wall time against the single
  download), and a herd whose fetching worker is killed half-way.
- Loopback: the same herd against both caches with an unthrottled upstream, warm blob
  throughput, and warm manifest request rates measured with wrk.
Reported as ratios because these machines are noisy.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import platform
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import requests
import yaml

from bench import gc as gc_bench
from bench.load import ACCEPT, SECONDS, ab_head, wrk
from tests.support.clients import skopeo_copy, skopeo_policy
from tests.support.fakes import FrozenServer
from tests.support.images import Pusher, make_layer, single
from tests.support.servers import (
    ROOT,
    Distribution,
    Gunicorn,
    RedisServer,
    ThrottledRelay,
    TokenServer,
)

BLOB_MIB = int(os.environ.get("BENCH_BLOB_MIB", "256"))
HERD = int(os.environ.get("BENCH_HERD", "50"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "4"))
# 25 MiB/s is about a 200 Mbit/s home link.
WAN_MIBPS = float(os.environ.get("BENCH_WAN_MIBPS", "25"))
# How long an offline pull may take before we call it hung (skopeo itself waits far longer).
OFFLINE_PATIENCE = 60


def download(url: str) -> tuple[int, str, float]:
    """(status, sha256 hex, time to first byte) of one streamed GET."""
    started = time.monotonic()
    with requests.get(url, stream=True, timeout=300) as response:
        chunks = response.iter_content(1 << 20)
        first = next(chunks, b"")
        ttfb = time.monotonic() - started
        hasher = hashlib.sha256(first)
        for chunk in chunks:
            hasher.update(chunk)
    return response.status_code, hasher.hexdigest(), ttfb


def herd(url: str, clients: int) -> dict:
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: download(url), range(clients)))
    ttfbs = sorted(r[2] for r in results)
    return {
        "wall": time.monotonic() - started,
        "ttfb_p50": ttfbs[len(ttfbs) // 2],
        "ok": sum(1 for r in results if r[0] == 200),
        "digests": {r[1] for r in results},
    }


def killed_herd(url: str, clients: int, expected: str, kill_when) -> dict:
    """A herd whose fetcher is killed by `kill_when()`; each client retries until it has the
    verified blob (at most 5 attempts), as Docker and containerd retry a failed layer."""

    def one(_):
        for attempt in range(1, 6):
            try:
                status, digest, _ = download(url)
            except requests.RequestException:
                continue
            if status == 200 and digest == expected:
                return attempt
        return 0

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients + 1) as pool:
        killer = pool.submit(kill_when)
        attempts = list(pool.map(one, range(clients)))
        killed = killer.result()
    return {
        "wall": time.monotonic() - started,
        "ok": sum(1 for a in attempts if a),
        "retried": sum(1 for a in attempts if a > 1),
        "killed": killed,
    }


def throughput(url: str, size: int) -> float:
    started = time.monotonic()
    got = 0
    with requests.get(url, stream=True, timeout=300) as response:
        for chunk in response.iter_content(1 << 20):
            got += len(chunk)
    assert got == size, (got, size)
    return size / (time.monotonic() - started) / (1 << 20)


def upstream_blob_gets(upstream: Distribution, mark: int, digest: str) -> int:
    return sum(
        1 for m, p, s in upstream.requests_since(mark) if m == "GET" and digest in p and s < 400
    )


def wan_scenarios(cache: Gunicorn, store: redis.Redis, relay: ThrottledRelay, images) -> dict:
    """Cold single download, herd and killed herd through the bandwidth-capped upstream."""
    base = f"{cache.url}/v2/wan.test/library"
    r: dict = {}
    for name in ("single", "herd", "kill"):
        requests.get(f"{base}/{name}/manifests/1", headers={"Accept": ACCEPT}, timeout=60)
    single_layer, size = images["single"]
    started = time.monotonic()
    status, digest, _ = download(f"{base}/single/blobs/{single_layer}")
    r["single_wall"] = time.monotonic() - started
    assert status == 200 and f"sha256:{digest}" == single_layer

    herd_layer, _ = images["herd"]
    before = relay.bytes_down
    r["herd"] = herd(f"{base}/herd/blobs/{herd_layer}", HERD)
    r["herd"]["upstream_mib"] = (relay.bytes_down - before) / (1 << 20)

    kill_layer, _ = images["kill"]

    def kill_half_way() -> int:
        # The fetcher's pid is in the lease value (<host>:<pid>:<token>); kill -9 it once
        # the fill record says half the blob is on disk.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            written = store.hget(f"pt:fill:{kill_layer}", "written")
            holder = store.get(f"pt:lease:blob:{kill_layer}")
            if written and holder and int(written) >= size // 2:
                pid = int(holder.decode().split(":")[1])
                os.kill(pid, signal.SIGKILL)
                return pid
            time.sleep(0.05)
        raise RuntimeError("the fill never reached half-way")

    before = relay.bytes_down
    r["kill"] = killed_herd(f"{base}/kill/blobs/{kill_layer}", HERD, kill_layer[7:], kill_half_way)
    r["kill"]["upstream_mib"] = (relay.bytes_down - before) / (1 << 20)
    return r


def timed_pull(policy: Path, ref: str, dest: Path) -> tuple[bool, float]:
    """(succeeded, seconds) of a skopeo pull, given up after OFFLINE_PATIENCE seconds."""
    started = time.monotonic()
    try:
        ok = skopeo_copy(policy, ref, dest, check=False, timeout=OFFLINE_PATIENCE).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    return ok, time.monotonic() - started


def offline_scenarios(servers: dict[str, str], upstream: Distribution, work: Path) -> dict:
    """Cached and uncached skopeo pulls with upstream stopped, then frozen (accepting
    connections, never answering). pullthrough is asked through `stale.test`, a registry
    entry with tag_ttl 0, so every tag is due for revalidation: the worst case."""
    policy = skopeo_policy(work)
    refs = {
        "pullthrough": ("stale.test/library/offline:1", "stale.test/library/neverpulled:1"),
        "distribution": ("library/offline:1", "library/neverpulled:1"),
    }
    for name, base in servers.items():
        cached, _ = refs[name]
        skopeo_copy(policy, f"{base.removeprefix('http://')}/{cached}", work / f"warm-{name}")
    out: dict = {}
    upstream.stop()
    frozen = None
    try:
        for state in ("stopped", "frozen"):
            if state == "frozen":
                frozen = FrozenServer(upstream.port).start()
            for name, base in servers.items():
                host = base.removeprefix("http://")
                cached, uncached = refs[name]
                out[(state, name, "cached")] = timed_pull(
                    policy, f"{host}/{cached}", work / f"{state}-{name}-cached"
                )
                out[(state, name, "uncached")] = timed_pull(
                    policy, f"{host}/{uncached}", work / f"{state}-{name}-uncached"
                )
    finally:
        if frozen is not None:
            frozen.stop()
    return out


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="pt-bench-"))
    redis_server = RedisServer(work / "redis").start()
    token = TokenServer(work / "token").start()
    upstream = Distribution(work / "upstream", token=token).start()
    relay = ThrottledRelay(upstream.port, WAN_MIBPS).start()
    pusher = Pusher(upstream.url, token.realm, token.service)
    images: dict[str, tuple[str, int]] = {}
    for seed, name in enumerate(("bench", "single", "herd", "kill")):
        image = single(f"library/{name}", "1", [make_layer(seed, BLOB_MIB << 20)], docker=True)
        pusher.push(image)
        layer = max(image.blobs, key=lambda d: len(image.blobs[d]))
        images[name] = (layer, len(image.blobs[layer]))
        if name == "bench":
            bench_manifest = image.digest
    pusher.push(single("library/offline", "1", [make_layer(7, 1 << 20)], docker=True))
    layer, size = images["bench"]

    config = work / "pullthrough.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"root": str(work / "pt-data")},
                "redis": {"url": redis_server.url},
                "registries": [
                    {"name": "docker.io", "url": upstream.url},
                    {"name": "wan.test", "url": relay.url},
                    {"name": "stale.test", "url": upstream.url, "tag_ttl": 0},
                ],
            }
        )
    )
    cache = Gunicorn(config, work / "pt", workers=WORKERS).start()
    proxy = Distribution(work / "proxy", proxy_of=upstream.url).start()
    servers = {"pullthrough": cache.url, "distribution": proxy.url}
    results: dict[str, dict] = {}
    try:
        wan = wan_scenarios(cache, redis.Redis.from_url(redis_server.url), relay, images)
        for name, base in servers.items():
            r: dict = {}
            blob_url = f"{base}/v2/library/bench/blobs/{layer}"
            # Manifests first, as a client would (distribution's proxy needs it too).
            manifest_url = f"{base}/v2/library/bench/manifests/1"
            requests.get(manifest_url, headers={"Accept": ACCEPT}, timeout=60).raise_for_status()
            mark = upstream.mark()
            r["herd"] = herd(blob_url, HERD)
            r["herd"]["upstream_gets"] = upstream_blob_gets(upstream, mark, layer)
            time.sleep(1)
            r["mbps"] = throughput(blob_url, size)
            mark = upstream.mark()
            for ref in ("1", bench_manifest):
                kind = "tag" if ref == "1" else "digest"
                url = f"{base}/v2/library/bench/manifests/{ref}"
                r[f"{kind}_GET"] = wrk(url, work)
                r[f"{kind}_HEAD"] = ab_head(url)
            r["manifest_upstream_requests"] = len(
                [x for x in upstream.requests_since(mark) if "/manifests/" in x[1]]
            )
            results[name] = r
        offline = offline_scenarios(servers, upstream, work)
    finally:
        cache.stop()
        proxy.stop()
        relay.stop()
        upstream.stop()
        token.stop()
        redis_server.stop()
    write_report(wan, results, offline, size, gc_bench.main())


def write_report(wan: dict, results: dict, offline: dict, size: int, gc: list[str]) -> None:
    pt, dist = results["pullthrough"], results["distribution"]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    mib = size / (1 << 20)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    wan_rows = [
        ("single cold download, 1 client (s)", f"{wan['single_wall']:.2f}"),
        (f"herd of {HERD}: wall time (s)", f"{wan['herd']['wall']:.2f}"),
        (
            "herd wall / single cold download (goal ≤ 1.5)",
            f"{wan['herd']['wall'] / wan['single_wall']:.2f}",
        ),
        ("herd: median TTFB (s)", f"{wan['herd']['ttfb_p50']:.3f}"),
        (
            "herd: clients with 200 / distinct digests",
            f"{wan['herd']['ok']} / {len(wan['herd']['digests'])}",
        ),
        ("herd: MiB sent by upstream", f"{wan['herd']['upstream_mib']:.1f}"),
        ("fetcher killed half-way: clients with verified bytes", f"{wan['kill']['ok']} / {HERD}"),
        ("fetcher killed half-way: clients that had to retry", wan["kill"]["retried"]),
        ("fetcher killed half-way: MiB sent by upstream", f"{wan['kill']['upstream_mib']:.1f}"),
        ("fetcher killed half-way: wall time (s)", f"{wan['kill']['wall']:.2f}"),
    ]

    def rate_cell(r: dict) -> str:
        cell = f"{r['rps']:.0f}; {r['p50_ms']:.2f}"
        if "p99_ms" in r:
            cell += f"; {r['p99_ms']:.1f}"
        if r.get("errors"):
            cell += f" ({r['errors']} socket errors)"
        return cell

    def rate_row(kind: str, method: str) -> tuple:
        a, b = pt[f"{kind}_{method}"], dist[f"{kind}_{method}"]
        p99 = "; p99 ms" if method == "GET" else ""
        return (
            f"manifest {method} by {kind} (req/s; p50 ms{p99})",
            rate_cell(a),
            rate_cell(b),
            ratio(a["rps"], b["rps"]),
        )

    rows = [
        (
            "herd: upstream blob GETs",
            pt["herd"]["upstream_gets"],
            dist["herd"]["upstream_gets"],
            "",
        ),
        ("herd: clients with 200", pt["herd"]["ok"], dist["herd"]["ok"], ""),
        (
            "herd: distinct digests served",
            len(pt["herd"]["digests"]),
            len(dist["herd"]["digests"]),
            "",
        ),
        (
            "herd: median TTFB (s)",
            f"{pt['herd']['ttfb_p50']:.3f}",
            f"{dist['herd']['ttfb_p50']:.3f}",
            ratio(dist["herd"]["ttfb_p50"], pt["herd"]["ttfb_p50"]),
        ),
        (
            "herd: wall time (s)",
            f"{pt['herd']['wall']:.2f}",
            f"{dist['herd']['wall']:.2f}",
            ratio(dist["herd"]["wall"], pt["herd"]["wall"]),
        ),
        (
            "warm blob, 1 client (MiB/s)",
            f"{pt['mbps']:.0f}",
            f"{dist['mbps']:.0f}",
            ratio(pt["mbps"], dist["mbps"]),
        ),
        rate_row("tag", "GET"),
        rate_row("tag", "HEAD"),
        rate_row("digest", "GET"),
        rate_row("digest", "HEAD"),
        (
            "upstream manifest requests during the wrk runs",
            pt["manifest_upstream_requests"],
            dist["manifest_upstream_requests"],
            "",
        ),
    ]

    def pull(key: tuple) -> str:
        ok, seconds = offline[key]
        if not ok and seconds >= OFFLINE_PATIENCE:
            return f"hung (gave up after {OFFLINE_PATIENCE} s)"
        return f"{'pulled' if ok else 'failed'} in {seconds:.2f} s"

    offline_rows = [
        (
            f"upstream {state}: {kind} image",
            pull((state, "pullthrough", kind)),
            pull((state, "distribution", kind)),
        )
        for state in ("stopped", "frozen")
        for kind in ("cached", "uncached")
    ]
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `make bench` (bench/__main__.py). pullthrough: gunicorn, {WORKERS} gevent "
        "workers, real Redis. distribution: Debian's docker-registry 2.8 in proxy mode. Both "
        "pull from the same local distribution upstream behind a token server, on 127.0.0.1. "
        "Herd clients are Python threads hashing every byte; GET rates come from wrk "
        "(2 threads, 32 connections), HEAD rates from ApacheBench (32 keep-alive connections; "
        "it reports whole milliseconds). Everything shares the same 2 cores, so read the ratios.",
        "",
        f"Machine: {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"{platform.platform()}, Python {platform.python_version()}; commit {commit}; "
        f"blobs {mib:.0f} MiB; herd {HERD} clients; wrk runs {SECONDS:g} s each.",
        "",
        f"## Cold blobs through a {WAN_MIBPS:g} MiB/s upstream link (pullthrough)",
        "",
        "The upstream sits behind a loopback relay that caps the bandwidth of everything it "
        "sends (about a 200 Mbit/s home link) and counts the bytes. distribution is not run "
        f"here: it sends one upstream GET per client, so its herd would take about {HERD}x the "
        "single download through the same link.",
        "",
        "| figure | pullthrough |",
        "|---|---|",
        *[f"| {a} | {b} |" for a, b in wan_rows],
        "",
        "## Loopback, side by side",
        "",
        "| figure | pullthrough | distribution | ratio (pullthrough better when > 1) |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        "On an unthrottled loopback upstream a single cold download takes about a second, so "
        "the herd's wall time is bounded by the clients hashing "
        f"{HERD} x {mib:.0f} MiB on the same 2 cores, not by the upstream.",
        "",
        "## Upstream down",
        "",
        "skopeo pulls a cached image (1 MiB layer) and one never pulled, after the upstream "
        "was stopped, then while a server on its port accepts connections and never answers. "
        "pullthrough is asked through a registry entry with `tag_ttl: 0`, so every tag request "
        "tries upstream first (the worst case; default timeouts: connect 5 s, metadata 5 s; "
        "breaker after 5 failures).",
        "",
        "| scenario | pullthrough | distribution |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in offline_rows],
        "",
        *gc,
        "Not yet measured (issue #9): cold/warm skopeo pulls of an image set, 8-client "
        "throughput and CPU per GB, nginx sendfile as the limit, peak RSS with a 1 GiB blob, "
        "the PNG chart.",
        "",
    ]
    out = ROOT / "docs" / "benchmarks.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
