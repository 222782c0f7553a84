"""`make bench` (its S3 part; alone: `make bench-s3`): pullthrough on S3, two nodes.

The store is OpenStack Swift with s3api on loopback (as in the tests); the upstream is
distribution behind its token server and a bandwidth-capped relay (as Docker Hub over a home
link). Two pullthrough nodes share the bucket and one Redis.

- Warm blob throughput from the S3 driver, 1 and 8 curl clients, against the limit: the same
  object read straight from the store with boto3 (the issue's yardstick) and with curl on a
  presigned URL (Swift's own speed, same client as ours), and against redirect mode (curl
  follows pullthrough's 307 to the presigned URL). Median of REPEATS rounds, taking turns.
- A cold herd spread over both nodes: upstream GETs and bytes, time to first byte on each
  node, and wall time against one download through the link.
- A node with a local tier (storage.s3.local_cache): a committed blob's herd on it (bucket
  reads, from Swift's access log), then the blob from its local copy against nginx serving
  that same file, and the node's CPU per GiB.
- A cold herd over two nodes that both have a local tier: the same figures as the first
  herd, plus the bucket's reads of the fill's pieces (at most one per node is the goal).
- A cached manifest by tag and by digest (wrk): requests/s and the bucket requests it cost,
  on a node that remembers the bucket's answers (storage.s3.lookup_ttl, the default) and on
  one that asks the bucket every time (lookup_ttl 0).

Writes its section of docs/benchmarks.md (after `<!-- s3 -->`).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

import requests

from bench.clients import CLIENTS_PER_PROCESS, download
from bench.clients import herd as herd_clients
from bench.load import ACCEPT, BLOB_MIB, HERD, REPEATS, SECONDS, WAN_MIBPS, curl_downloads, wrk
from bench.nginx import Nginx
from bench.proc import cpu_seconds, timed_cpu, tree
from bench.report import S3_MARKER, commit_id, table, write_section
from registry.config import S3Settings
from tests.conftest import SWIFT_BUCKET, s3_section
from tests.support.images import Pusher, make_layer, single
from tests.support.servers import (
    ROOT,
    Distribution,
    Gunicorn,
    RedisServer,
    ThrottledRelay,
    TokenServer,
)
from tests.support.swift import Swift

NODE_WORKERS = 2
PART_SIZE = S3Settings.part_size  # the default
HERD_NOTE = (
    "Without a local tier every client's bytes come from the store, so the herd reads the "
    "blob once per client through Swift's one proxy worker: that, not the link, is its wall "
    "time. A cold download through an S3 node also waits for the commit before its last byte: "
    "the server-side copy of its last piece into the blob's multipart upload, and the upload's "
    "completion (the other pieces were copied as they were stored)."
)


def boto3_downloads(client, key: str, clients: int, size: int) -> float:
    """Aggregate MiB/s of `clients` threads each reading the object with get_object."""

    def one(_):
        body = client.get_object(Bucket=SWIFT_BUCKET, Key=key)["Body"]
        got = 0
        for chunk in body.iter_chunks(1 << 20):
            got += len(chunk)
        if got != size:
            raise RuntimeError(f"boto3 read {got} of {size} bytes")

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    return clients * size / (time.monotonic() - started) / (1 << 20)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="pullthrough-bench-s3-"))
    started: list = []
    try:
        redis_server = RedisServer(work / "redis").start()
        started.append(redis_server)
        token = TokenServer(work / "token").start()
        started.append(token)
        upstream = Distribution(work / "upstream", token=token).start()
        started.append(upstream)
        swift = Swift(work).start()
        started.append(swift)
        swift.create_bucket(SWIFT_BUCKET)
        relay = ThrottledRelay(upstream.port, WAN_MIBPS).start()
        started.append(relay)

        pusher = Pusher(upstream.url, token.realm, token.service)
        size = BLOB_MIB << 20
        layers = {}
        for name, seed in (
            ("warm", 101),
            ("herd", 102),
            ("single", 103),
            ("tierherd", 104),
            ("tiersingle", 105),
        ):
            image = single(f"s3bench/{name}", "1", [make_layer(seed, size)], docker=True)
            pusher.push(image)
            layers[name] = max(image.blobs, key=lambda d: len(image.blobs[d]))
            layers[name + "_size"] = len(image.blobs[layers[name]])

        prefix = f"bench/{os.getpid()}"
        registries = [{"name": "docker.io", "url": relay.url}]

        def node(name: str, **s3) -> Gunicorn:
            server = Gunicorn.with_config(
                work / name,
                redis_server.url,
                registries,
                workers=NODE_WORKERS,
                # The product's default piece size (the tests' 5 MiB gives small blobs
                # several pieces): each piece is four bucket requests (PUT, GET by the
                # other node, its copy into the blob, its deletion).
                storage=s3_section(swift, prefix, part_size=PART_SIZE, **s3),
                # Every simulated host is 127.0.0.1 here: no per-client limits.
                limits={"max_fills_per_client": 0, "client_upstream_per_minute": 0},
            )
            started.append(server)
            return server

        a, b = node("node-a"), node("node-b")
        asking = node("node-0", lookup_ttl=0)
        redirecting = node("node-r", redirect=True)
        tiered, tiered_b = (
            node(name, local_cache={"path": str(work / f"{name}-tier"), "max_size": "8GiB"})
            for name in ("node-t", "node-u")
        )
        nginx = Nginx(work / "nginx", work / "node-t-tier", NODE_WORKERS).start()
        started.append(nginx)
        results = {
            "warm": warm(a, redirecting, swift, prefix, layers),
            "herd": cross_node_herd(a, b, upstream, relay, layers, swift, prefix),
        }
        results["tier"] = tier_scenarios(tiered, nginx, swift, prefix, layers)
        results["tier_herd"] = cross_node_herd(
            tiered, tiered_b, upstream, relay, layers, swift, prefix, "tierherd", "tiersingle"
        )
        results["tier_herd"]["piece_reads"] = piece_reads(swift, layers["tierherd"])
        results["manifests"] = manifest_rates(
            {
                f"remembered (lookup_ttl {S3Settings.lookup_ttl:g} s)": a,
                "asked every time (lookup_ttl 0)": asking,
            },
            swift,
            prefix,
            work,
        )
        write(results, layers)
    finally:
        for server in reversed(started):
            server.stop()
    shutil.rmtree(work, ignore_errors=True)  # gigabytes; kept after a failure, for its logs


TIER_HERD_NOTE = (
    "A tier client's last byte waits for its node's verified copy, not for the bucket's commit "
    "of the blob (which follows): so the one cold download here, through a tier node, is "
    "shorter than the one through a node without a tier above, and the herd starts once that "
    "download's commit is in the bucket. The herd's clients run in processes of their own "
    "(bench/clients.py), apart from the relay that is the link. The herd keeps both cores "
    "busy: its wall time is bounded by the CPU seconds above (their sum over 2 cores), the "
    "clients' share included."
)


def warm(node: Gunicorn, redirecting: Gunicorn, swift: Swift, prefix: str, layers) -> dict:
    layer, size = layers["warm"], layers["warm_size"]
    path = f"/v2/s3bench/warm/blobs/{layer}"
    status, digest, _ = download(node.url + path)  # the fill, through the link
    assert status == 200 and f"sha256:{digest}" == layer
    client = swift.client()
    key = f"{prefix}/blobs/sha256/{layer[7:9]}/{layer[7:]}"
    presigned = client.generate_presigned_url(
        "get_object", Params={"Bucket": SWIFT_BUCKET, "Key": key}, ExpiresIn=3600
    )
    ways = {
        "pullthrough (S3 driver, streamed)": lambda n: curl_downloads(node.url + path, n, size),
        "pullthrough redirect mode (curl -L)": lambda n: curl_downloads(
            redirecting.url + path, n, size, follow=True
        ),
        "curl on a presigned URL (Swift itself)": lambda n: curl_downloads(presigned, n, size),
        "boto3 get_object (the limit)": lambda n: boto3_downloads(client, key, n, size),
    }
    return take_turns(ways, "pullthrough (S3 driver, streamed)", node, size)


def take_turns(ways: dict, ours: str, node: Gunicorn, size: int) -> dict:
    """MiB/s of each way with 1 and 8 clients, REPEATS rounds with the ways taking turns
    (medians), and the CPU per GiB of `node` while way `ours` ran."""
    out: dict = {}
    for clients in (1, 8):
        runs: dict[str, list[float]] = {name: [] for name in ways}
        cpu: list[float] = []
        for _ in range(REPEATS):
            for name, way in ways.items():
                if name == ours:
                    _wall, seconds, rate = timed_cpu(
                        tree(node.proc.pid), lambda w=way, n=clients: w(n)
                    )
                    cpu.append(seconds / (clients * size / (1 << 30)))
                else:
                    rate = way(clients)
                runs[name].append(rate)
        out[clients] = {name: median(rates) for name, rates in runs.items()}
        out[clients]["cpu_per_gib"] = median(cpu)
    return out


def cross_node_herd(
    a: Gunicorn,
    b: Gunicorn,
    upstream,
    relay,
    layers,
    swift: Swift,
    prefix: str,
    herd="herd",
    single="single",
) -> dict:
    single_layer, size = layers[single], layers[single + "_size"]
    started = time.monotonic()
    status, _digest, _ = download(f"{a.url}/v2/s3bench/{single}/blobs/{single_layer}")
    single_wall = time.monotonic() - started
    assert status == 200
    # A tier client has its last byte before the bucket's commit of the blob (its last
    # piece's copy and the upload's completion): the herd starts once that commit is done,
    # so that it is not charged with the single download's work.
    hexpart = single_layer[7:]
    commit_after = bucket_has(swift, f"{prefix}/blobs/sha256/{hexpart[:2]}/{hexpart}")

    layer = layers[herd]
    mark = upstream.mark()
    before = relay.bytes_down
    urls = [f"{(a, b)[i % 2].url}/v2/s3bench/{herd}/blobs/{layer}" for i in range(HERD)]
    # Where the machine's CPU went during the herd: it is what bounds its wall time here.
    groups = {
        "pullthrough nodes": tree(a.proc.pid) + tree(b.proc.pid),
        "Swift": [pid for p in swift.procs.values() for pid in tree(p.pid)],
        "the bench process (the link's relay)": [os.getpid()],
    }
    cpu_before = {name: cpu_seconds(pids) for name, pids in groups.items()}
    run = herd_clients(urls)
    cpu = {name: cpu_seconds(pids) - cpu_before[name] for name, pids in groups.items()}
    cpu[f"the {HERD} clients ({-(-HERD // CLIENTS_PER_PROCESS)} processes)"] = run["cpu"]
    results = run["results"]
    gets = sum(
        1 for m, p, s in upstream.requests_since(mark) if m == "GET" and layer in p and s < 400
    )
    return {
        "clients": HERD,
        "ok": sum(1 for s, d, _t in results if s == 200 and f"sha256:{d}" == layer),
        "upstream_gets": gets,
        "upstream_mib": (relay.bytes_down - before) / (1 << 20),
        "size_mib": size / (1 << 20),
        "ttfb_a": median(t for _s, _d, t in results[0::2]),
        "ttfb_b": median(t for _s, _d, t in results[1::2]),
        "wall": run["wall"],
        "single_wall": single_wall,
        "single_commit_after": commit_after,
        "cpu": cpu,
    }


def bucket_has(swift: Swift, key: str, patience: float = 120.0) -> float:
    """Seconds until the object `key` is in the bucket (polled with HEAD)."""
    client = swift.client()
    started = time.monotonic()
    while True:
        try:
            client.head_object(Bucket=SWIFT_BUCKET, Key=key)
            return time.monotonic() - started
        except client.exceptions.ClientError:
            if time.monotonic() - started > patience:
                raise RuntimeError(f"{key} was not committed within {patience:.0f} s") from None
            time.sleep(0.1)


def piece_reads(swift: Swift, layer: str) -> dict:
    """Clients' GETs of the fill's pieces and of the committed object, from Swift's log."""
    time.sleep(1)  # Swift logs a request when it ends
    hexpart = layer[7:]
    needle = f"/uploads/sha256/{hexpart}/"
    lines = [line for line in swift.access if needle in line]
    offsets = {line.split(needle)[1].split(" ")[0] for line in lines}
    reads = [swift.object_gets(f"uploads/sha256/{hexpart}/{offset}") for offset in offsets]
    return {
        "pieces": len(offsets),
        "max_per_piece": max(reads, default=0),
        "total": sum(reads),
        "object": swift.object_gets(f"blobs/sha256/{hexpart[:2]}/{hexpart}"),
    }


def tier_scenarios(node: Gunicorn, nginx: Nginx, swift: Swift, prefix: str, layers) -> dict:
    """The committed herd blob through a node with a local tier: a herd on it (what the bucket
    served, from its access log), then warm from the local copy against nginx on that file."""
    layer, size = layers["herd"], layers["herd_size"]
    path = f"/v2/s3bench/herd/blobs/{layer}"
    key = f"{prefix}/blobs/sha256/{layer[7:9]}/{layer[7:]}"
    reads = swift.object_gets(key)
    run = herd_clients([node.url + path] * 16)
    results, herd_wall = run["results"], run["wall"]
    ok = sum(1 for s, d, _t in results if s == 200 and f"sha256:{d}" == layer)
    time.sleep(1)  # Swift logs a request when it ends
    out: dict = {
        "herd_ok": ok,
        "herd_wall": herd_wall,
        "bucket_reads": swift.object_gets(key) - reads,
    }
    ways = {
        "pullthrough, local tier": lambda n: curl_downloads(node.url + path, n, size),
        "nginx on the same file": lambda n: curl_downloads(nginx.blob_url(layer), n, size),
    }
    return {**out, **take_turns(ways, "pullthrough, local tier", node, size)}


def manifest_rates(nodes: dict[str, Gunicorn], swift: Swift, prefix: str, work: Path) -> dict:
    """GETs/s of the warm image's manifest by tag and by digest on each node (wrk, SECONDS
    each), and the bucket requests under the repository's keys per manifest answered (Swift's
    access log)."""
    asked = re.compile(
        rf"proxy-server: \d\S* .* (?:GET|HEAD) /\S*/{re.escape(prefix)}/repositories/\S* HTTP/"
    )
    out: dict = {}
    for name, server in nodes.items():
        manifests = f"{server.url}/v2/s3bench/warm/manifests"
        answer = requests.get(f"{manifests}/1", headers={"Accept": ACCEPT}, timeout=60)
        answer.raise_for_status()
        digest = answer.headers["Docker-Content-Digest"]
        for kind, url in (("tag", f"{manifests}/1"), ("digest", f"{manifests}/{digest}")):
            requests.get(url, headers={"Accept": ACCEPT}, timeout=60).raise_for_status()
            time.sleep(1)  # Swift logs a request when it ends
            logged = len(swift.access)
            rate = wrk(url, work)
            time.sleep(1)
            bucket = sum(1 for line in swift.access[logged:] if asked.search(line))
            out[(name, kind)] = {**rate, "bucket_per_request": bucket / (rate["rps"] * SECONDS)}
    return out


def manifest_lines(rates: dict) -> list[str]:
    rows = [
        [
            f"GET by {kind}",
            name,
            f"{r['rps']:.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['bucket_per_request']:.3f}",
        ]
        for (name, kind), r in sorted(rates.items(), key=lambda item: item[0][1], reverse=True)
    ]
    return [
        f"A cached manifest on one node ({NODE_WORKERS} workers; wrk, 2 threads, 32 connections, "
        f"{SECONDS:g} s each), against a node that asks the bucket every time:",
        "",
        *table(["request", "node", "req/s", "p50 ms", "bucket requests per manifest"], rows),
        "",
        "A node remembers a tag's record while it is fresh and no tag moved (`pt:tag-moves`), "
        "a revision while nothing was deleted (`pt:deletions`), each for at most "
        "`lookup_ttl`: its manifests cost one Redis read each and, past each process's first, "
        "no bucket request.",
        "",
    ]


def write(results: dict, layers: dict) -> None:
    warm_rows = []
    for clients, rates in results["warm"].items():
        limit = rates["boto3 get_object (the limit)"]
        for name, rate in rates.items():
            if name == "cpu_per_gib":
                continue
            warm_rows.append([str(clients), name, f"{rate:.0f}", f"{rate / limit:.2f}x"])
    herd = results["herd"]
    lines = [
        "## S3 storage, two nodes",
        "",
        f"`make bench` (or `make bench-s3` alone): two pullthrough nodes ({NODE_WORKERS} gunicorn "
        "workers each) on one bucket of OpenStack Swift 2.30 (s3api, one object server, "
        f"loopback) and one Redis; upstream through a {WAN_MIBPS:.0f} MiB/s link; pieces of "
        f"{PART_SIZE >> 20} MiB (the default `part_size`). "
        f"Blob {layers['warm_size'] / (1 << 20):.0f} MiB; median of {REPEATS} rounds, the ways "
        f"taking turns. Commit {commit_id()}.",
        "",
        "Warm blob, MiB/s (ratio against boto3 reading the same object from the same store):",
        "",
        *table(["clients", "way", "MiB/s", "vs boto3"], warm_rows),
        "",
        "pullthrough's CPU per GiB served from S3: "
        + ", ".join(
            f"{c} client{'s' if c > 1 else ''} {r['cpu_per_gib']:.2f} s"
            for c, r in results["warm"].items()
        )
        + ".",
        "",
        f"Cold herd spread over both nodes ({herd['clients']} clients, half on each):",
        "",
        *table(
            ["measure", "value"],
            [
                ["verified downloads", f"{herd['ok']} of {herd['clients']}"],
                ["upstream GETs of the blob", str(herd["upstream_gets"])],
                [
                    "upstream MiB sent (blob size)",
                    f"{herd['upstream_mib']:.0f} ({herd['size_mib']:.0f})",
                ],
                [
                    "median time to first byte, node a / node b (s)",
                    f"{herd['ttfb_a']:.2f} / {herd['ttfb_b']:.2f}",
                ],
                [
                    "herd wall / one cold download (s)",
                    f"{herd['wall']:.1f} / {herd['single_wall']:.1f}",
                ],
            ],
        ),
        "",
        HERD_NOTE,
        "",
        *tier_lines(results["tier"]),
        *tier_herd_lines(results["tier_herd"]),
        *manifest_lines(results["manifests"]),
    ]
    write_section(ROOT / "docs" / "benchmarks.md", S3_MARKER, lines)
    print("\n".join(lines))


def tier_herd_lines(herd: dict) -> list[str]:
    reads = herd["piece_reads"]
    return [
        f"Cold herd over two nodes that both have a local tier ({herd['clients']} clients, "
        "half on each): the fetching node's fill writes its tier copy, the other node follows "
        "the fill once into its own, and each node's clients stream that copy.",
        "",
        *table(
            ["measure", "value"],
            [
                ["verified downloads", f"{herd['ok']} of {herd['clients']}"],
                [
                    "upstream GETs of the blob / MiB sent",
                    f"{herd['upstream_gets']} / "
                    f"{herd['upstream_mib']:.0f} ({herd['size_mib']:.0f})",
                ],
                [
                    "bucket reads of the fill's pieces: pieces, most reads of one, all reads",
                    f"{reads['pieces']}, {reads['max_per_piece']}, {reads['total']}",
                ],
                ["bucket reads of the committed object", str(reads["object"])],
                [
                    "median time to first byte, node a / node b (s)",
                    f"{herd['ttfb_a']:.2f} / {herd['ttfb_b']:.2f}",
                ],
                [
                    "herd wall / one cold download (s)",
                    f"{herd['wall']:.1f} / {herd['single_wall']:.1f} "
                    f"({herd['wall'] / herd['single_wall']:.2f}x)",
                ],
                [
                    "the one download's commit in the bucket, after its last byte (s)",
                    f"{herd['single_commit_after']:.1f}",
                ],
                *(
                    [f"CPU seconds during the herd: {name}", f"{seconds:.1f}"]
                    for name, seconds in herd["cpu"].items()
                ),
            ],
        ),
        "",
        TIER_HERD_NOTE,
        "",
    ]


def tier_lines(tier: dict) -> list[str]:
    rows = []
    for clients in (1, 8):
        ours = tier[clients]["pullthrough, local tier"]
        nginx = tier[clients]["nginx on the same file"]
        rows.append(
            [
                str(clients),
                f"{ours:.0f}",
                f"{nginx:.0f}",
                f"{ours / nginx:.2f}x",
                f"{tier[clients]['cpu_per_gib']:.2f}",
            ]
        )
    return [
        "A third node with a local tier (`storage.s3.local_cache`): the herd blob, committed "
        f"in the bucket, asked by 16 clients at once: {tier['herd_ok']} of 16 verified in "
        f"{tier['herd_wall']:.1f} s, {tier['bucket_reads']} read(s) of it from the bucket "
        "(Swift's access log). Then served from the node's local copy, against nginx "
        "serving that same file (median of the rounds):",
        "",
        *table(["clients", "pullthrough MiB/s", "nginx MiB/s", "ratio", "CPU s per GiB"], rows),
        "",
    ]


if __name__ == "__main__":
    main()
