"""`make soak`: 200 concurrent clients with a mixed workload against several gunicorn workers
for SOAK_SECONDS (10 minutes by default) while faults happen, then the store is verified.
Writes docs/reliability.md.

Workload (every client verifies what it gets: manifests and blobs against their digests,
ranges against the known bytes): warm manifests by tag and digest (GET and HEAD), warm blobs
whole and in ranges, tag lists and the catalog, and cold content: a pusher adds a new image
upstream every few seconds and clients herd onto it.
Faults on a schedule: a GC sweep every SOAK_GC_EVERY seconds, a worker killed with SIGKILL at a
third of the run, Redis restarted empty (all coordination lost) at two thirds.
Watched every 5 s: each worker's RSS and open files, Redis's key count, leases held.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
import requests
from requests.adapters import HTTPAdapter

from bench.load import ACCEPT
from bench.proc import rss_mib
from bench.progress import say
from bench.report import write_section
from tests.support.images import Image, Pusher, make_layer, single, standard_images
from tests.support.servers import (
    ROOT,
    Distribution,
    Gunicorn,
    RedisServer,
    TokenServer,
    run_module,
)

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "200"))
WORKERS = int(os.environ.get("SOAK_WORKERS", "4"))
GC_EVERY = float(os.environ.get("SOAK_GC_EVERY", "120"))
PUSH_EVERY = 5.0
# 503s for cold content are expected while Redis is down and until clients' retries pass.
OUTAGE_GRACE = 10.0


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_status: collections.Counter = collections.Counter()
        self.by_op: collections.Counter = collections.Counter()
        self.wrong_bytes: list[str] = []
        self.errors: collections.Counter = collections.Counter()
        self.server_errors: list[tuple[float, str, int, str]] = []

    def note(self, op: str, status: int, url: str, body: bytes = b"") -> None:
        with self.lock:
            self.by_op[op] += 1
            self.by_status[status] += 1
            if status >= 500:
                self.server_errors.append(
                    (time.time(), url, status, body[:200].decode(errors="replace"))
                )

    def summary(self) -> str:
        with self.lock:
            statuses = ", ".join(f"{n} x {s}" for s, n in sorted(self.by_status.items()))
            total = sum(self.by_op.values())
            return f"{total} requests ({statuses}), {len(self.wrong_bytes)} with wrong bytes"


class Catalogue:
    """What exists upstream, known byte for byte, growing as the pusher adds images."""

    def __init__(self, images: list[Image]) -> None:
        self.lock = threading.Lock()
        self.images = list(images)
        self.fresh: list[Image] = []
        # soak/moving:latest is re-pointed at every push, so its older manifests become
        # garbage that the sweeps delete while clients may still hold their digests.
        self.moving: dict[str, Image] = {}

    def pick(self, rng: random.Random) -> Image:
        with self.lock:
            if self.fresh and rng.random() < 0.3:
                return rng.choice(self.fresh[-3:])  # the newest: cold, clients herd on it
            return rng.choice(self.images)

    def add(self, image: Image, moving: Image) -> None:
        with self.lock:
            self.images.append(image)
            self.fresh.append(image)
            self.moving[moving.digest] = moving


def flat(image: Image) -> Image:
    """A single-platform image to pull (an index's first child)."""
    return image.children[0] if image.children else image


def client_loop(base: str, catalogue: Catalogue, tally: Tally, stop: threading.Event, seed: int):
    rng = random.Random(seed)
    session = requests.Session()
    session.mount("http://", HTTPAdapter(pool_maxsize=2, max_retries=0))
    while not stop.is_set():
        image = catalogue.pick(rng)
        one = flat(image)
        repo = image.repository
        op = rng.choices(
            ["tag", "digest", "head", "blob", "range", "tags", "catalog", "moving"],
            weights=[25, 15, 10, 20, 15, 10, 5, 5],
        )[0]
        try:
            if op == "moving":
                # Whatever the tag points at now (or up to tag_ttl ago): a manifest we pushed,
                # matching its digest header, and its layer.
                url = f"{base}/v2/soak/moving/manifests/latest"
                r = session.get(url, headers={"Accept": ACCEPT}, timeout=60)
                if r.status_code == 200:
                    digest = r.headers.get("Docker-Content-Digest", "")
                    pushed = catalogue.moving.get(digest)
                    if pushed is None or r.content != pushed.manifest:
                        tally.wrong_bytes.append(f"{url} -> {digest}")
                    else:
                        layer = max(pushed.blobs, key=lambda d: len(pushed.blobs[d]))
                        tally.note(op, r.status_code, url)
                        url = f"{base}/v2/soak/moving/blobs/{layer}"
                        r = session.get(url, timeout=120)
                        got = hashlib.sha256(r.content).hexdigest()
                        if r.status_code == 200 and got != layer[7:]:
                            tally.wrong_bytes.append(url)
            elif op == "tag":
                url = f"{base}/v2/{repo}/manifests/{image.tag}"
                r = session.get(url, headers={"Accept": ACCEPT}, timeout=60)
                if r.status_code == 200 and r.content != image.manifest:
                    tally.wrong_bytes.append(url)
            elif op in ("digest", "head"):
                url = f"{base}/v2/{repo}/manifests/{one.digest}"
                method = session.get if op == "digest" else session.head
                r = method(url, headers={"Accept": ACCEPT}, timeout=60)
                got = hashlib.sha256(r.content).hexdigest()
                if r.status_code == 200 and op == "digest" and got != one.digest[7:]:
                    tally.wrong_bytes.append(url)
            elif op in ("blob", "range"):
                digest = rng.choice(list(one.blobs))
                data = one.blobs[digest]
                url = f"{base}/v2/{repo}/blobs/{digest}"
                if op == "blob":
                    r = session.get(url, timeout=120)
                    if r.status_code == 200 and hashlib.sha256(r.content).hexdigest() != digest[7:]:
                        tally.wrong_bytes.append(url)
                else:
                    start = rng.randrange(len(data))
                    end = min(len(data) - 1, start + rng.randrange(1, 1 << 20))
                    r = session.get(url, headers={"Range": f"bytes={start}-{end}"}, timeout=120)
                    if r.status_code == 206 and r.content != data[start : end + 1]:
                        tally.wrong_bytes.append(f"{url} {start}-{end}")
            elif op == "tags":
                url = f"{base}/v2/{repo}/tags/list?n=10"
                r = session.get(url, timeout=60)
            else:
                url = f"{base}/v2/_catalog?n=50"
                r = session.get(url, timeout=60)
            tally.note(op, r.status_code, url, r.content if r.status_code >= 500 else b"")
        except Exception as exc:  # counted and reported, so that no client thread dies
            with tally.lock:
                tally.errors[type(exc).__name__] += 1


def push_round(pusher: Pusher, catalogue: Catalogue, n: int) -> None:
    """A new image upstream (cold for the cache) and soak/moving:latest re-pointed at it."""
    layers = [make_layer(10_000 + 2 * n, 256 << 10), make_layer(10_001 + 2 * n, 3 << 20)]
    image = single(f"soak/fresh{n % 20}", f"v{n}", layers, docker=True)
    pusher.push(image)
    moving = single("soak/moving", "latest", layers[:1], docker=True)
    pusher.push(moving)
    catalogue.add(image, moving)


def pusher_loop(pusher: Pusher, catalogue: Catalogue, stop: threading.Event) -> None:
    n = 0
    while not stop.wait(PUSH_EVERY):
        n += 1
        push_round(pusher, catalogue, n)


def watch(cache: Gunicorn, client: redis.Redis, samples: list, stop: threading.Event) -> None:
    while not stop.wait(5):
        workers = cache.worker_pids()
        fds = []
        for pid in workers:
            with contextlib.suppress(OSError):
                fds.append(len(os.listdir(f"/proc/{pid}/fd")))
        try:
            keys, leases = client.dbsize(), len(list(client.scan_iter("pt:lease:*")))
        except redis.RedisError:
            keys = leases = -1
        samples.append(
            {
                "t": time.time(),
                "rss": [rss_mib(pid) for pid in workers],
                "fds": fds,
                "keys": keys,
                "leases": leases,
            }
        )


def main() -> None:
    import yaml

    work = Path(tempfile.mkdtemp(prefix="pt-soak-"))
    redis_server = RedisServer(work / "redis").start()
    token = TokenServer(work / "token").start()
    upstream = Distribution(work / "upstream", token=token).start()
    pusher = Pusher(upstream.url, token.realm, token.service)
    images = [i for k, i in standard_images(16 << 20).images.items() if k != "private"]
    for image in images:
        pusher.push(image)
    config = work / "pullthrough.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"root": str(work / "data")},
                "redis": {"url": redis_server.url},
                "registries": [{"name": "docker.io", "url": upstream.url, "tag_ttl": 30}],
                # Sweep unreferenced content at once and drop tags unpulled for a minute:
                # the most churn a sweep can cause while clients pull.
                "gc": {"delay": "0s", "keep_pulled_within": "60s"},
                # Every simulated host is 127.0.0.1 here: no per-client limits.
                "limits": {"max_fills_per_client": 0, "client_upstream_per_minute": 0},
            }
        )
    )
    cache = Gunicorn(config, work / "pt", workers=WORKERS).start()
    client = redis.Redis.from_url(redis_server.url)
    catalogue, tally, samples, events = Catalogue(images), Tally(), [], []
    push_round(pusher, catalogue, 0)
    stop = threading.Event()
    threads = [
        threading.Thread(target=client_loop, args=(cache.url, catalogue, tally, stop, i))
        for i in range(CLIENTS)
    ]
    threads.append(threading.Thread(target=pusher_loop, args=(pusher, catalogue, stop)))
    threads.append(threading.Thread(target=watch, args=(cache, client, samples, stop)))
    started, started_at = time.monotonic(), time.time()
    for thread in threads:
        thread.start()
    killed = restarted = False
    next_gc = started + GC_EVERY
    gc_runs: list[dict] = []
    try:
        while (elapsed := time.monotonic() - started) < SECONDS:
            time.sleep(1)
            if int(elapsed) % 60 == 0 and elapsed >= 1:
                say(f"soak: {elapsed / 60:.0f} of {SECONDS / 60:.0f} min, {tally.summary()}")
            if not killed and elapsed > SECONDS / 3:
                victim = cache.worker_pids()[0]
                os.kill(victim, signal.SIGKILL)
                events.append((time.time(), f"worker {victim} killed with SIGKILL"))
                say(events[-1][1])
                killed = True
            if not restarted and elapsed > 2 * SECONDS / 3:
                redis_server.stop()
                events.append((time.time(), "Redis stopped"))
                time.sleep(3)
                redis_server.start()
                events.append((time.time(), "Redis started again, empty"))
                say("Redis stopped and started again, empty")
                restarted = True
            if time.monotonic() > next_gc:
                run = run_module("workers", config, "gc", check=False, timeout=600)
                report = json.loads(run.stdout) if run.returncode == 0 else {}
                gc_runs.append({"rc": run.returncode, **report})
                events.append((time.time(), f"GC sweep rc={run.returncode}"))
                say(events[-1][1])
                next_gc = time.monotonic() + GC_EVERY
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
    done = run_module("registry", config, "verify", check=False, timeout=600)
    verify = {"rc": done.returncode, "out": done.stdout}
    leases_after = len(list(client.scan_iter("pt:lease:*")))
    cache.stop()
    upstream.stop()
    token.stop()
    redis_server.stop()
    shutil.rmtree(work, ignore_errors=True)
    write(
        tally,
        samples,
        events,
        gc_runs,
        verify,
        leases_after,
        started_at,
        time.monotonic() - started,
    )


def write(tally, samples, events, gc_runs, verify, leases_after, first, wall) -> None:
    total = sum(tally.by_status.values())
    steady = samples[len(samples) // 5 :] or samples  # after the first fifth: warmed up
    rss_start, rss_end = max(steady[0]["rss"]), max(steady[-1]["rss"])
    rss_peak = max(max(s["rss"]) for s in samples)
    fds_peak = max(max(s["fds"] or [0]) for s in samples)
    fds_end = max(steady[-1]["fds"] or [0])
    keys = [s["keys"] for s in steady if s["keys"] >= 0]
    server_errors = collections.Counter(
        (status, body) for _, _, status, body in tally.server_errors
    )
    outage = [e for e in events if "Redis" in e[1]]
    lines = [
        "## Soak: `make soak`",
        "",
        "Produced by `make soak` (bench/soak.py): real gunicorn with "
        f"{WORKERS} gevent workers, real Redis, a real distribution upstream behind a token "
        f"server, {CLIENTS} concurrent clients for {wall:.0f} s on this 2-core machine. Every "
        "client verifies what it receives (manifests and blobs against their digests, ranges "
        "against the known bytes). New images are pushed upstream every "
        f"{PUSH_EVERY:g} s and clients herd onto them (cold fills throughout).",
        "",
        "### Load held",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests answered | {total} ({total / wall:.0f}/s) |",
        f"| by operation | {', '.join(f'{k} {v}' for k, v in tally.by_op.most_common())} |",
        f"| by status | {', '.join(f'{k}: {v}' for k, v in sorted(tally.by_status.items()))} |",
        f"| 5xx answers (when and why: below) | {len(tally.server_errors)} |",
        f"| wrong bytes (digest or range mismatch) | {len(tally.wrong_bytes)} |",
        f"| client-side errors (connection reset, timeout) | {dict(tally.errors) or 0} |",
        f"| worker RSS, steady state start → end (MiB, largest worker) | "
        f"{rss_start:.0f} → {rss_end:.0f} (peak {rss_peak:.0f}) |",
        f"| open files per worker, peak / at the end | {fds_peak} / {fds_end} |",
        f"| Redis keys, steady state min / max / end | {min(keys)} / {max(keys)} / {keys[-1]} |"
        if keys
        else "| Redis keys | (not sampled) |",
        f"| leases held after the run | {leases_after} |",
        f"| `python -m registry verify` | rc {verify['rc']}: {verify['out'].strip()[-300:]} |",
        "",
        "### Faults survived",
        "",
        "| at (s) | event |",
        "|---|---|",
        *[f"| {t - first:.0f} | {what} |" for t, what in events],
        "",
        f"GC sweeps: {len(gc_runs)}, deleted manifests/blobs per run: "
        + ", ".join(
            f"{r.get('deleted_manifests', '?')}/{r.get('deleted_blobs', '?')}" for r in gc_runs
        ),
        "",
    ]
    if server_errors:
        lines += [
            "5xx answers by (status, body):",
            "",
            *[f"- {n} x {status}: `{body}`" for (status, body), n in server_errors.items()],
            "",
        ]
        if outage:
            lines.append(
                "Redis outage window: "
                + ", ".join(f"{t - first:.0f} s {what}" for t, what in outage)
            )
            lines.append("")
    if tally.wrong_bytes:
        lines += ["Wrong bytes:", "", *[f"- {u}" for u in tally.wrong_bytes[:20]], ""]
    write_section(ROOT / "docs" / "reliability.md", "<!-- soak -->", lines)
    print("\n".join(lines))
    # While Redis is down a cold fill cannot take its lease and is refused with a 503 (cached
    # content keeps serving); any other 5xx, or one outside that window, is a failure.
    window = (outage[0][0], outage[-1][0] + OUTAGE_GRACE) if outage else (0, 0)
    unexplained = [
        e for e in tally.server_errors if e[2] != 503 or not window[0] <= e[0] <= window[1]
    ]
    bad = len(unexplained) + len(tally.wrong_bytes) + (verify["rc"] != 0) + leases_after
    print(f"unexplained 5xx: {len(unexplained)}", file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
