"""`make bench`: pullthrough side by side with CNCF distribution's proxy mode, same machine, same
run, same local upstream (distribution behind a token server). Writes docs/benchmarks.md.

A first harness: thundering herd, warm blob throughput and warm manifest request rates.
Reported as ratios because these machines are noisy.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import requests
import yaml

from registry.mediatypes import MANIFEST_TYPES
from tests.support.images import Pusher, make_layer, single
from tests.support.servers import ROOT, Distribution, Gunicorn, RedisServer, TokenServer

BLOB_MIB = int(os.environ.get("BENCH_BLOB_MIB", "256"))
HERD = int(os.environ.get("BENCH_HERD", "50"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
# What Docker and containerd send; without it distribution rewrites manifests to schema 1.
ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES[:4])}


def herd(url: str, clients: int) -> dict:
    def one(_):
        started = time.monotonic()
        with requests.get(url, stream=True, timeout=300) as response:
            chunks = response.iter_content(1 << 20)
            first = next(chunks)
            ttfb = time.monotonic() - started
            hasher = hashlib.sha256(first)
            for chunk in chunks:
                hasher.update(chunk)
        return response.status_code, hasher.hexdigest(), ttfb

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    ttfbs = sorted(r[2] for r in results)
    return {
        "wall": time.monotonic() - started,
        "ttfb_p50": ttfbs[len(ttfbs) // 2],
        "ok": sum(1 for r in results if r[0] == 200),
        "digests": len({r[1] for r in results}),
    }


def throughput(url: str, size: int) -> float:
    started = time.monotonic()
    got = 0
    with requests.get(url, stream=True, timeout=300) as response:
        for chunk in response.iter_content(1 << 20):
            got += len(chunk)
    assert got == size, (got, size)
    return size / (time.monotonic() - started) / (1 << 20)


def rate(url: str, seconds: float, connections: int = 32, method: str = "GET") -> float:
    deadline = time.monotonic() + seconds

    def loop(_):
        session = requests.Session()
        count = 0
        while time.monotonic() < deadline:
            response = session.request(method, url, headers=ACCEPT, timeout=30)
            assert response.status_code == 200, response.status_code
            count += 1
        return count

    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        total = sum(pool.map(loop, range(connections)))
    return total / seconds


def upstream_blob_gets(upstream: Distribution, mark: int, digest: str) -> int:
    return sum(
        1 for m, p, s in upstream.requests_since(mark) if m == "GET" and digest in p and s < 400
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="pt-bench-"))
    redis = RedisServer(work / "redis").start()
    token = TokenServer(work / "token").start()
    upstream = Distribution(work / "upstream", token=token).start()
    big = single("library/bench", "1", [make_layer(42, BLOB_MIB << 20, "big.bin")], docker=True)
    Pusher(upstream.url, token.realm, token.service).push(big)
    layer = max(big.blobs, key=lambda d: len(big.blobs[d]))
    size = len(big.blobs[layer])

    config = work / "pullthrough.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"root": str(work / "pt-data")},
                "redis": {"url": redis.url},
                "registries": [{"name": "docker.io", "url": upstream.url}],
            }
        )
    )
    cache = Gunicorn(config, work / "pt", workers=4).start()
    proxy = Distribution(work / "proxy", proxy_of=upstream.url).start()
    servers = {"pullthrough": cache.url, "distribution": proxy.url}
    results: dict[str, dict] = {}
    try:
        for name, base in servers.items():
            r: dict = {}
            blob_url = f"{base}/v2/library/bench/blobs/{layer}"
            # Manifests first, as a client would (distribution's proxy needs it too).
            manifest_url = f"{base}/v2/library/bench/manifests/1"
            requests.get(manifest_url, headers=ACCEPT, timeout=60).raise_for_status()
            mark = upstream.mark()
            r["herd"] = herd(blob_url, HERD)
            r["herd"]["upstream_gets"] = upstream_blob_gets(upstream, mark, layer)
            time.sleep(1)
            r["mbps"] = throughput(blob_url, size)
            mark = upstream.mark()
            r["tag_rps"] = rate(f"{base}/v2/library/bench/manifests/1", SECONDS)
            r["digest_rps"] = rate(f"{base}/v2/library/bench/manifests/{big.digest}", SECONDS)
            r["manifest_upstream_requests"] = len(
                [x for x in upstream.requests_since(mark) if "/manifests/" in x[1]]
            )
            results[name] = r
    finally:
        cache.stop()
        proxy.stop()
        upstream.stop()
        token.stop()
        redis.stop()
    write_report(results, size)


def write_report(results: dict, size: int) -> None:
    pt, dist = results["pullthrough"], results["distribution"]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    rows = [
        (
            "herd: upstream blob GETs",
            pt["herd"]["upstream_gets"],
            dist["herd"]["upstream_gets"],
            "",
        ),
        ("herd: clients with 200", pt["herd"]["ok"], dist["herd"]["ok"], ""),
        ("herd: distinct digests served", pt["herd"]["digests"], dist["herd"]["digests"], ""),
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
        (
            "manifest GET by tag (req/s, 32 conns)",
            f"{pt['tag_rps']:.0f}",
            f"{dist['tag_rps']:.0f}",
            ratio(pt["tag_rps"], dist["tag_rps"]),
        ),
        (
            "manifest GET by digest (req/s, 32 conns)",
            f"{pt['digest_rps']:.0f}",
            f"{dist['digest_rps']:.0f}",
            ratio(pt["digest_rps"], dist["digest_rps"]),
        ),
        (
            "upstream manifest requests during those runs",
            pt["manifest_upstream_requests"],
            dist["manifest_upstream_requests"],
            "",
        ),
    ]
    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (bench/__main__.py). pullthrough: gunicorn, 4 gevent workers, "
        "real Redis. distribution: Debian's docker-registry 2.8 in proxy mode. Both pull from the "
        "same local distribution upstream behind a token server, on 127.0.0.1. The load "
        "generator is Python (requests + threads) on the same 2 cores, so absolute rates are "
        "bounded by the client; read the ratios.",
        "",
        f"Machine: {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"{platform.platform()}, Python {platform.python_version()}; commit {commit}; "
        f"blob {size / 2**20:.0f} MiB; herd {HERD} clients; rate runs {SECONDS:.0f} s each.",
        "",
        "| figure | pullthrough | distribution | ratio (pullthrough better when > 1) |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
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
