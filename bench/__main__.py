"""`make bench`: pullthrough side by side with CNCF distribution's proxy mode and, where it
applies, nginx serving the same files with sendfile (the limit); same machine, same run, same
local upstream (distribution behind a token server). Writes docs/benchmarks.md and
docs/benchmarks.png.

Scenarios:
- WAN: the upstream behind a relay that caps its bandwidth (as Docker Hub over a home link):
  one cold download, a 50-client herd on another cold blob (wall time against the single
  download), a herd whose fetching worker is killed half-way, and cold then warm skopeo pulls
  of an image set (upstream bytes against the unique bytes the set needs).
- Loopback: the same herd against both caches with an unthrottled upstream, warm blob
  throughput (1 and 8 clients, CPU per GiB), warm manifest request rates (median of several
  rounds), peak RSS and the aggregate rate while a cold 1 GiB blob streams to 8 clients (median
  of several rounds, a fresh blob each), upstream stopped or frozen.
Reported as ratios because these machines are noisy.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median

import redis
import requests
import yaml

from bench import gc as gc_bench
from bench.clients import download
from bench.clients import herd as herd_clients
from bench.load import (
    ACCEPT,
    BLOB_MIB,
    CDN_CONNECTION_MIBPS,
    CDN_TOTAL_MIBPS,
    HERD,
    HUGE_MIB,
    ONE_CLIENT_REPEATS,
    RANGE_MIB,
    REPEATS,
    ROUNDS,
    TOTAL_ONLY_MIBPS,
    WAN_MIBPS,
    WORKERS,
    ab_head,
    curl_downloads,
    wrk,
)
from bench.nginx import Nginx
from bench.proc import RssSampler, cpu_seconds, quiet, timed_cpu, tree
from bench.profile import manifest_profile
from bench.progress import say, scenario
from bench.report import OFFLINE_PATIENCE, write_report
from tests.support.clients import skopeo_copy, skopeo_policy
from tests.support.fakes import FrozenServer
from tests.support.images import Image, Layer, Pusher, index, make_layer, sha256, single
from tests.support.servers import (
    Distribution,
    Gunicorn,
    RedisServer,
    ThrottledRelay,
    TokenServer,
)


def herd(url: str, clients: int) -> dict:
    run = herd_clients([url] * clients)
    results = run["results"]
    ttfbs = sorted(r[2] for r in results)
    return {
        "wall": run["wall"],
        "ttfb_p50": ttfbs[len(ttfbs) // 2],
        "ok": sum(1 for r in results if r[0] == 200),
        "digests": {r[1] for r in results},
        "client_cpu": run["cpu"],
    }


def killed_herd(url: str, clients: int, expected: str, kill_when) -> dict:
    """A herd whose fetcher is killed by `kill_when()`; each client retries until it has the
    verified blob (at most 5 attempts), as Docker and containerd retry a failed layer."""

    def one(_):
        for attempt in range(1, 6):
            try:
                status, digest, _ = download(url)
            except (OSError, http.client.HTTPException):
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


def range_scenarios(
    cache: Gunicorn, relays: dict[str, ThrottledRelay], blobs: dict[str, tuple], token
) -> dict:
    """A cold RANGE_MIB blob with curl, straight from the upstream and then through the cache
    (its first pull: parallel ranges), each through the same capped link; the link counts
    what the upstream sent for the cache."""
    out: dict = {}
    for case, relay in relays.items():
        repository, digest, size = blobs[case]
        direct = curl_downloads(
            f"{relay.url}/v2/{repository}/blobs/{digest}",
            1,
            size,
            headers=(f"Authorization: Bearer {token(repository)}",),
        )
        before = relay.bytes_down
        cached = curl_downloads(f"{cache.url}/v2/{case}.test/{repository}/blobs/{digest}", 1, size)
        out[case] = {
            "direct_s": size / direct / (1 << 20),
            "cache_s": size / cached / (1 << 20),
            "upstream_bytes": relay.bytes_down - before,
            "size": size,
        }
    return out


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


def image_set() -> list[Image]:
    """What a small deployment pulls: a multi-arch index, an app image with several layers,
    and an image with one large layer; a base layer shared by all of them."""
    base = make_layer(100, 2 << 20)
    children = [
        single("set/multi", "1", [base, make_layer(101, 8 << 20), make_layer(102, 4 << 20)]),
        single(
            "set/multi",
            "1",
            [base, make_layer(103, 8 << 20), make_layer(104, 4 << 20)],
            arch="arm64",
        ),
    ]
    app_layers = [base, *(make_layer(105 + i, n << 19) for i, n in enumerate((32, 2, 1, 48)))]
    return [
        index("set/multi", "1", children),
        single("set/app", "1", app_layers, docker=True),
        single("set/big", "1", [base, make_layer(109, BLOB_MIB << 20)], docker=True),
    ]


def unique_bytes(images: list[Image]) -> int:
    """Bytes a cache must fetch at least once to serve the whole set (`skopeo copy --all`)."""
    content: dict[str, int] = {}
    for image in images:
        for one in (image, *image.children):
            content[one.digest] = len(one.manifest)
            content.update({d: len(b) for d, b in one.blobs.items()})
    return sum(content.values())


def set_pulls(pulls: dict[str, tuple[str, ThrottledRelay]], images, upstream, work) -> dict:
    """Cold skopeo pulls of the image set from each cache (each cache reaches the upstream
    through its own bandwidth-capped relay, which counts the bytes it sent), then ROUNDS warm
    pulls with the caches taking turns (median wall time: skopeo's own disk writes are noisy).
    """
    policy = skopeo_policy(work)
    out: dict = {}

    def pull_all(name: str, prefix: str, relay: ThrottledRelay, phase: str) -> dict:
        before, mark = relay.bytes_down, upstream.mark()
        started = time.monotonic()
        for image in images:
            dest = work / f"set-{name}-{phase}-{image.repository.replace('/', '-')}"
            skopeo_copy(policy, f"{prefix}/{image.repository}:{image.tag}", dest, timeout=600)
        return {
            "wall": time.monotonic() - started,
            "upstream_bytes": relay.bytes_down - before,
            "upstream_requests": len(upstream.requests_since(mark)),
        }

    for name, (prefix, relay) in pulls.items():
        out[(name, "cold")] = pull_all(name, prefix, relay, "cold")
    warm: dict[str, list[dict]] = {name: [] for name in pulls}
    for round_ in range(ROUNDS):
        for name, (prefix, relay) in pulls.items():
            warm[name].append(pull_all(name, prefix, relay, f"warm{round_}"))
    for name, runs in warm.items():
        out[(name, "warm")] = {
            "wall": median([r["wall"] for r in runs]),
            "upstream_bytes": sum(r["upstream_bytes"] for r in runs),
            "upstream_requests": sum(r["upstream_requests"] for r in runs),
        }
    return out


def blob_throughput(urls: dict[str, tuple[str, int]], size: int) -> dict:
    """Warm blob MiB/s with 1 and 8 concurrent clients, and the server's CPU seconds per GiB
    sent, from every server that holds the blob; REPEATS runs (ONE_CLIENT_REPEATS for one
    client) with the servers taking turns, each round starting with the next one (one
    client's speed moves with where the scheduler puts it), median shown. `urls` maps a
    server to (url, pid of its main process)."""
    out: dict = {}
    names = list(urls)
    for clients in (1, 8):
        repeats = ONE_CLIENT_REPEATS if clients == 1 else REPEATS
        runs: dict[str, list[float]] = {name: [] for name in urls}
        cpu: dict[str, float] = dict.fromkeys(urls, 0.0)
        for url, _ in urls.values():
            curl_downloads(url, 1, size)  # page cache and connection pools warm for everyone
        for round_ in range(repeats):
            turn = round_ % len(names)
            for name in names[turn:] + names[:turn]:
                url, pid = urls[name]
                # The process tree now: gunicorn replaces a worker the WAN scenario killed.
                _, used, mibps = timed_cpu(
                    tree(pid), lambda u=url, n=clients: curl_downloads(u, n, size)
                )
                runs[name].append(mibps)
                cpu[name] += used
        for name in urls:
            served_gib = clients * size * repeats / (1 << 30)
            out[(name, clients)] = {
                "mibps": median(runs[name]),
                "cpu_per_gib": cpu[name] / served_gib,
            }
    return out


def manifest_rates(
    servers: dict[str, str], digest: str, floor_url: str, upstream: Distribution, work: Path
) -> dict:
    """GET/HEAD by tag and by digest, ROUNDS rounds with the servers taking turns, so that a
    slow spell of this shared machine hits all; the floor (bench/floor.py: a bare Flask app
    under the same gunicorn settings, the same bytes) is the limit. Also counts the upstream
    manifest requests each server made during its runs."""
    runs: dict = {}
    asked = dict.fromkeys(servers, 0)
    for _ in range(ROUNDS):
        for name, base in {**servers, "floor": floor_url}.items():
            mark = upstream.mark()
            for ref in ("1", digest):
                kind = "tag" if ref == "1" else "digest"
                url = f"{base}/v2/library/bench/manifests/{ref}"
                runs.setdefault((name, kind, "GET"), []).append(wrk(url, work))
                runs.setdefault((name, kind, "HEAD"), []).append(ab_head(url))
            if name in asked:
                asked[name] += sum(
                    1 for r in upstream.requests_since(mark) if "/manifests/" in r[1]
                )
    return {"runs": runs, "upstream_requests": asked}


def huge_blob_memory(servers: dict[str, tuple[list[str], list[int]]], size: int) -> dict:
    """Peak RSS of each server process while a cold HUGE_MIB blob streams to 8 clients, the
    aggregate rate, and the CPU seconds the server still spends after the clients' last byte
    (each run starts on an idle machine). `servers` maps a server to (one URL per round, each
    a blob it has never seen, and its pids); the servers take turns, the first one changing
    every round (a single run of either moves by ±20% on this machine)."""
    out: dict = {name: [] for name in servers}
    rounds = len(next(iter(servers.values()))[0])
    for round_ in range(rounds):
        names = list(servers)[:: -1 if round_ % 2 else 1]
        for name in names:
            urls, pids = servers[name]
            quiet()
            with RssSampler(pids) as sampler:
                mibps = curl_downloads(urls[round_], 8, size)
            cpu = cpu_seconds(pids)
            quiet()
            out[name].append(
                {
                    "before": sampler.before,
                    "peak": sampler.peak,
                    "mibps": mibps,
                    "cpu_after": cpu_seconds(pids) - cpu,
                }
            )
    return out


def huge_layers(size: int, rounds: int) -> Iterator[Image]:
    """`rounds` images of one HUGE_MIB layer of random bytes each (not a real tarball:
    nothing unpacks it here, and gzip would take longer than the scenario): library/huge,
    then library/huge-1 ... whose layers differ from it in their first 8 bytes (fresh blobs,
    made one at a time)."""
    rng = random.Random(77)
    data = bytearray(b"".join(rng.randbytes(1 << 20) for _ in range(size >> 20)))
    for round_ in range(rounds):
        if round_:
            data[:8] = round_.to_bytes(8, "big")
        blob = bytes(data)
        name = f"library/huge-{round_}" if round_ else "library/huge"
        yield single(name, "1", [Layer(blob, sha256(blob))], docker=True)
        del blob


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="pt-bench-"))
    redis_server = RedisServer(work / "redis").start()
    token = TokenServer(work / "token").start()
    upstream = Distribution(work / "upstream", token=token).start()
    relay = ThrottledRelay(upstream.port, WAN_MIBPS).start()
    set_relays = {
        "pullthrough": ThrottledRelay(upstream.port, WAN_MIBPS).start(),
        "distribution": ThrottledRelay(upstream.port, WAN_MIBPS).start(),
    }
    range_relays = {
        "cdn": ThrottledRelay(upstream.port, CDN_TOTAL_MIBPS, CDN_CONNECTION_MIBPS).start(),
        "total": ThrottledRelay(upstream.port, TOTAL_ONLY_MIBPS).start(),
    }
    pusher = Pusher(upstream.url, token.realm, token.service)
    images: dict[str, tuple[str, int]] = {}
    for seed, name in enumerate(("bench", "single", "herd", "kill")):
        image = single(f"library/{name}", "1", [make_layer(seed, BLOB_MIB << 20)], docker=True)
        pusher.push(image)
        layer = max(image.blobs, key=lambda d: len(image.blobs[d]))
        images[name] = (layer, len(image.blobs[layer]))
        if name == "bench":
            bench_manifest, bench_image = image.digest, image
    pusher.push(single("library/offline", "1", [make_layer(7, 1 << 20)], docker=True))
    range_blobs = {}
    for seed, case in enumerate(range_relays, start=20):
        image = single(f"library/ranges-{case}", "1", [make_layer(seed, RANGE_MIB << 20)])
        pusher.push(image)
        blob = max(image.blobs, key=lambda d: len(image.blobs[d]))
        range_blobs[case] = (image.repository, blob, len(image.blobs[blob]))
    the_set = image_set()
    for image in the_set:
        pusher.push(image)
    huge_blobs = []  # (repository, digest), one per round; the first one stays for the warm runs
    huge_size = HUGE_MIB << 20
    for huge in huge_layers(huge_size, ROUNDS):
        pusher.push(huge)
        huge_blobs.append(
            (huge.repository, next(d for d, b in huge.blobs.items() if len(b) == huge_size))
        )
        del huge
    huge_digest = huge_blobs[0][1]
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
                    {"name": "set.test", "url": set_relays["pullthrough"].url},
                    *({"name": f"{case}.test", "url": r.url} for case, r in range_relays.items()),
                ],
                # Every simulated host is 127.0.0.1 here: no per-client limits.
                "limits": {"max_fills_per_client": 0, "client_upstream_per_minute": 0},
            }
        )
    )
    cache = Gunicorn(config, work / "pt", workers=WORKERS).start()
    proxy = Distribution(work / "proxy", proxy_of=upstream.url).start()
    set_proxy = Distribution(work / "set-proxy", proxy_of=set_relays["distribution"].url).start()
    nginx = Nginx(work / "nginx", work / "pt-data", workers=WORKERS).start()
    (work / "floor-manifest").write_bytes(bench_image.manifest)
    floor = Gunicorn(
        config,
        work / "floor",
        workers=WORKERS,
        app="bench.floor:app",
        env={
            "FLOOR_MANIFEST": str(work / "floor-manifest"),
            "FLOOR_MEDIA_TYPE": bench_image.media_type,
            "FLOOR_DIGEST": bench_manifest,
        },
    ).start()
    servers = {"pullthrough": cache.url, "distribution": proxy.url}
    main_pids = {"pullthrough": cache.proc.pid, "distribution": proxy.proc.pid}
    results: dict = {}
    try:
        with scenario("WAN: cold download, herd, fetcher killed"):
            store = redis.Redis.from_url(redis_server.url)
            results["wan"] = wan_scenarios(cache, store, relay, images)
        with scenario("cold blob in parallel ranges through capped links"):
            results["ranges"] = range_scenarios(cache, range_relays, range_blobs, pusher._token)
        with scenario("image set pulled with skopeo through the capped link"):
            results["set"] = set_pulls(
                {
                    "pullthrough": (
                        f"{cache.url.removeprefix('http://')}/set.test",
                        set_relays["pullthrough"],
                    ),
                    "distribution": (
                        set_proxy.url.removeprefix("http://"),
                        set_relays["distribution"],
                    ),
                },
                the_set,
                upstream,
                work,
            )
        results["set_unique"] = unique_bytes(the_set)
        herds: dict = {}
        for name, base in servers.items():
            blob_url = f"{base}/v2/library/bench/blobs/{layer}"
            # Manifests first, as a client would (distribution's proxy needs it too).
            manifest_url = f"{base}/v2/library/bench/manifests/1"
            requests.get(manifest_url, headers={"Accept": ACCEPT}, timeout=60).raise_for_status()
            mark = upstream.mark()
            quiet()
            with scenario(f"loopback herd of {HERD} on a cold blob: {name}"):
                herds[name] = herd(blob_url, HERD)
            herds[name]["upstream_gets"] = upstream_blob_gets(upstream, mark, layer)
            herds[name]["upstream_bytes"] = upstream.body_bytes_since(mark, layer)
        results["herd"] = herds
        cold_urls: dict[str, list[str]] = {}
        for name, base in servers.items():
            for repository, _ in huge_blobs:
                requests.get(
                    f"{base}/v2/{repository}/manifests/1", headers={"Accept": ACCEPT}, timeout=60
                ).raise_for_status()
            cold_urls[name] = [
                f"{base}/v2/{repository}/blobs/{digest}" for repository, digest in huge_blobs
            ]
        say(f"memory: a cold huge blob to 8 clients, {ROUNDS} rounds ...")
        results["memory"] = huge_blob_memory(
            {
                # gunicorn's workers only: the master serves nothing.
                "pullthrough": (cold_urls["pullthrough"], cache.worker_pids()),
                "distribution": (cold_urls["distribution"], [proxy.proc.pid]),
            },
            huge_size,
        )
        huge_urls = {name: (urls[0], main_pids[name]) for name, urls in cold_urls.items()}
        huge_urls["nginx"] = (nginx.blob_url(huge_digest), nginx.proc.pid)
        with scenario("warm blob throughput (1 and 8 clients)"):
            results["blob"] = blob_throughput(huge_urls, huge_size)
        with scenario("manifest request rates"):
            results["rates"] = manifest_rates(servers, bench_manifest, floor.url, upstream, work)
        with scenario("a cached manifest's CPU per request, by component"):
            results["profile"] = manifest_profile(config, work, bench_manifest)
        with scenario("upstream stopped or frozen"):
            results["offline"] = offline_scenarios(servers, upstream, work)
    finally:
        for server in (
            cache,
            proxy,
            set_proxy,
            nginx,
            floor,
            relay,
            *set_relays.values(),
            *range_relays.values(),
            upstream,
        ):
            server.stop()
        token.stop()
        redis_server.stop()
        # Gigabytes of blobs: several runs left behind once filled this machine's disk.
        shutil.rmtree(work, ignore_errors=True)
    with scenario("GC sweep of many blobs"):
        results["gc"] = gc_bench.main()
    write_report(results, size=size, huge_size=huge_size)
    say("docs/benchmarks.md and docs/benchmarks.png written")


if __name__ == "__main__":
    main()
