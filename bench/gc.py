"""GC benchmark (part of `make bench`): sweep time and peak memory on a generated store of
10,000 blobs and 2,000 manifests, and what a sweep does to serving latency.

Writes the "GC" section of docs/benchmarks.md (bench/__main__.py writes the rest).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import yaml

from bench.load import wrk
from registry.config import RegistrySettings
from registry.digests import Digest
from registry.names import Target
from registry.store import ContentStore, FilesystemDriver, TagRecord
from tests.support.images import single
from tests.support.servers import Gunicorn, RedisServer, start_module
from tests.support.stores import put_manifest, raw_layer

MANIFESTS = int(os.environ.get("BENCH_GC_MANIFESTS", "2000"))
BLOBS = int(os.environ.get("BENCH_GC_BLOBS", "10000"))
DAY = 86400


def generate(root: Path, rng: random.Random) -> dict:
    """A store like a busy cache's: MANIFESTS manifests (a quarter of them replaced by a newer
    one under the same tag, so garbage), layers shared between images, orphans. Files are
    written directly (no fsync per file) and aged two days so the delay does not protect them."""
    store = ContentStore(FilesystemDriver(root))
    repos = max(1, MANIFESTS // 5)
    layer_count = max(10, BLOBS - 2 * MANIFESTS - BLOBS // 10)
    pool = [raw_layer(rng, rng.randint(256, 4096)) for _ in range(layer_count)]
    hub = RegistrySettings("docker.io", "https://registry-1.docker.io")
    written: set[str] = set()

    def put_blob(digest: str, data: bytes) -> None:
        if digest in written:
            return
        written.add(digest)
        path = store.driver.local_path(store.blob_path(Digest.parse(digest)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    kept = 0
    for i in range(MANIFESTS):
        repo, tag = f"library/repo{i % repos}", f"t{i // repos}"
        image = single(repo, tag, rng.sample(pool, rng.randint(2, 6)), arch=f"a{i}")
        for digest, data in image.blobs.items():
            put_blob(digest, data)
        put_blob(image.digest, image.manifest)
        target = Target(hub, repo)
        put_manifest(store, target, image)
        if i % 4:  # three in four manifests are tagged; the rest lost their tag to a newer one
            store.write_tag(target, tag, TagRecord(Digest.parse(image.digest), image.media_type, 0))
            kept += 1
    for layer in pool:  # layers no image picked are orphans; so are these
        put_blob(layer.digest, layer.data)
    for _ in range(BLOBS - len(written)):
        orphan = raw_layer(rng, 512)
        put_blob(orphan.digest, orphan.data)
    now = time.time()
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (now - 2 * DAY, now - 2 * DAY))
    blobs = sum(1 for _ in store.iter_blobs())
    return {"blobs": blobs, "manifests": MANIFESTS, "tagged": kept, "store": store}


def timed_gc(config: Path, *args: str) -> tuple[dict, float, float]:
    """(report, seconds, peak RSS MiB) of `python -m workers gc` in its own process. The peak
    is VmHWM polled from /proc: wait4's ru_maxrss would count the forked bench process's
    memory from before the exec."""
    started = time.monotonic()
    proc = start_module(
        "workers", config, "gc", *args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    peak_kib = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kib = max(peak_kib, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.01)
    out = proc.stdout.read()
    proc.wait()
    seconds = time.monotonic() - started
    assert proc.returncode == 0, out
    return json.loads(out), seconds, peak_kib / 1024


def main() -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="pt-bench-gc-"))
    rng = random.Random(5)
    server = RedisServer(work / "redis").start()
    cache = None
    try:
        generated = generate(work / "data", rng)
        config = work / "config.yaml"
        config.write_text(
            yaml.safe_dump({"storage": {"root": str(work / "data")}, "redis": {"url": server.url}})
        )
        client = redis.Redis.from_url(server.url)
        now = time.time()
        client.zadd("pt:pulled", {"docker.io/library/repo0:t0": now})  # pulls are recorded
        dry, dry_s, dry_rss = timed_gc(config, "--dry-run")

        cache = Gunicorn(config, work / "pt", workers=2).start()
        store = generated["store"]
        some = next(
            (repo, scan)
            for repo, scan in store.scan_repositories().items()
            if scan.tags and repo.startswith("docker.io/")
        )
        tag = next(iter(some[1].tags))
        digest = store.read_tag_of(some[0], tag).digest
        url = f"{cache.url}/v2/{some[0].removeprefix('docker.io/')}/manifests/{digest}"
        idle = wrk(url, work)

        sweeping = start_module(
            "workers", config, "gc", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        during = wrk(url, work)
        sweeping.wait()
        swept = json.loads(sweeping.stdout.read())
    finally:
        if cache is not None:
            cache.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return [
        "## GC",
        "",
        f"A generated store of {generated['blobs']} blobs and {generated['manifests']} manifests "
        f"({generated['tagged']} tagged; the rest replaced by newer ones, plus orphan blobs), "
        "every file two days old. `python -m workers gc` in its own process; peak RSS is its "
        "VmHWM.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| dry run: wall time with start-up (s) | {dry_s:.2f} (scan and mark: "
        f"{dry['seconds']:.2f}) |",
        f"| dry run: peak RSS (MiB) | {dry_rss:.0f} |",
        f"| dry run: would delete manifests / blobs / MiB | {dry['deleted_manifests']} / "
        f"{dry['deleted_blobs']} / {dry['freed_bytes'] / 2**20:.1f} |",
        f"| sweep under load: seconds (report) | {swept['seconds']:.2f} |",
        f"| sweep under load: deleted manifests / blobs | {swept['deleted_manifests']} / "
        f"{swept['deleted_blobs']} |",
        f"| manifest GET by digest, idle (req/s; p50; p99 ms) | {idle['rps']:.0f}; "
        f"{idle['p50_ms']:.2f}; {idle['p99_ms']:.1f} |",
        f"| the same while the sweep runs (req/s; p50; p99 ms) | {during['rps']:.0f}; "
        f"{during['p50_ms']:.2f}; {during['p99_ms']:.1f} |",
        f"| socket errors during the sweep (wrk) | {during['errors']} |",
        "",
        "wrk runs for its whole duration; the sweep is shorter, so the second row mixes time "
        "with and without it running: read it as an upper bound on the slowdown's share.",
        "",
    ]


if __name__ == "__main__":
    print("\n".join(main()))
