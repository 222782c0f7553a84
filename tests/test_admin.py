"""Operating the cache: the admin CLI against a real populated cache, health endpoints (readiness
fails when Redis stops), and a graceful shutdown that lets an in-flight blob finish."""

from __future__ import annotations

import concurrent.futures
import email.utils
import hashlib
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import time

import pytest
import redis as redis_lib
import requests
import yaml

from registry.mediatypes import MANIFEST_TYPES
from tests.support.images import Layer, Pusher, sha256, single
from tests.support.servers import Gunicorn, RedisServer, proc_stat, run_module

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, redis_server, upstream, images):
    # Pull counts and indexes that other modules' caches left would show up in this one's.
    redis_lib.Redis.from_url(redis_server.url).flushall()
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("admin"),
        redis_server.url,
        [{"name": "docker.io", "url": upstream.url}],
        workers=2,
    )
    image = images["busybox"]
    for _ in range(2):
        requests.get(
            f"{server.url}/v2/{image.repository}/manifests/{image.tag}", headers=ACCEPT
        ).raise_for_status()
    for digest in image.blobs:
        requests.get(f"{server.url}/v2/{image.repository}/blobs/{digest}").raise_for_status()
    yield server
    server.stop()


def cli(cache, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_module("registry", cache.config_path, *args, check=check)


def deletions_token(cache) -> str | None:
    """The token each deletion from the store rewrites (read, never written, here)."""
    config = yaml.safe_load(cache.config_path.read_text())
    return redis_lib.Redis.from_url(config["redis"]["url"]).get("pt:deletions")


def blob_file(cache, digest: str):
    hexpart = digest.split(":")[1]
    return cache.data / "blobs" / "sha256" / hexpart[:2] / hexpart


def test_images_lists_what_is_cached_with_size_last_pull_and_pulls(cache, images):
    image = images["busybox"]
    size = sum(blob_file(cache, digest).stat().st_size for digest in image.blobs)
    deadline = time.monotonic() + 5  # counts gathered in each worker reach Redis within 2 s
    while True:
        out = cli(cache, "images").stdout
        line = next(line for line in out.splitlines() if line.startswith("library/busybox:1.36"))
        if line.endswith("\t2 pulls") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    fields = line.split("\t")
    assert fields[1] == image.digest
    assert fields[3] == f"{size / 2**20:.1f}MiB"
    assert fields[4].startswith("last pulled 20")
    assert fields[5] == "2 pulls"  # the fixture's two manifest GETs


def test_warm_fetches_every_platform_with_progress(cache, images):
    image = images["alpine"]
    run = cli(cache, "warm", f"{image.repository}:{image.tag}")
    assert "100%" in run.stderr and "bytes fetched" in run.stderr
    for child in image.children:
        for digest in child.blobs:
            assert blob_file(cache, digest).exists(), digest
    again = cli(cache, "warm", f"{image.repository}:{image.tag}")
    assert "0 bytes fetched" in again.stderr
    failed = cli(cache, "warm", "library/nonexistent:1", check=False)
    assert failed.returncode == 1 and "failed" in failed.stderr


def test_evict_drops_the_tag_and_the_next_pull_fetches_again(cache, images):
    image = images["ocisingle"]
    url = f"{cache.url}/v2/{image.repository}/manifests/{image.tag}"
    requests.get(url, headers=ACCEPT).raise_for_status()
    assert requests.get(url, headers=ACCEPT).headers["X-Cache"] == "HIT"
    token = deletions_token(cache)
    out = cli(cache, "evict", f"{image.repository}:{image.tag}").stdout
    assert image.digest in out
    # What S3 nodes remember the store said exists is stale now (pullthrough/presence.py).
    assert deletions_token(cache) not in (token, None)
    assert requests.get(url, headers=ACCEPT).headers["X-Cache"] == "MISS"
    missing = cli(cache, "evict", "library/never:1", check=False)
    assert missing.returncode == 1 and "not cached" in missing.stderr


def test_verify_finds_a_flipped_byte_and_removes_it_on_request(cache, images):
    image = images["busybox"]
    digest = max(image.blobs, key=lambda d: len(image.blobs[d]))
    path = blob_file(cache, digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    found = cli(cache, "verify", check=False)
    assert found.returncode == 1 and f"corrupt {digest}: found" in found.stdout
    token = deletions_token(cache)
    removed = cli(cache, "verify", "--delete", check=False)
    assert "removed" in removed.stdout and not path.exists()
    assert deletions_token(cache) not in (token, None)
    assert cli(cache, "verify").returncode == 0
    # The next pull fetches it again, verified.
    body = requests.get(f"{cache.url}/v2/{image.repository}/blobs/{digest}").content
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest


def test_rebuild_index_restores_a_flushed_redis(cache, redis_server):
    client = redis_lib.Redis.from_url(redis_server.url)
    client.flushall()
    rebuilt = json.loads(cli(cache, "rebuild-index").stdout)
    assert rebuilt["repositories"] >= 1 and rebuilt["blobs"] > 0
    assert client.zscore("pt:repos", "library/busybox") is not None
    files = [p for p in (cache.data / "blobs").rglob("*") if p.is_file()]
    on_disk = (sum(p.stat().st_size for p in files), len(files))
    assert (rebuilt["bytes"], rebuilt["blobs"]) == on_disk
    catalog = requests.get(f"{cache.url}/v2/_catalog").json()["repositories"]
    assert "library/busybox" in catalog
    client.close()


def test_gc_dry_run_reports_what_is_on_disk(cache):
    # The ratelimit command is tested from a real upstream's headers in test_figures.
    report = json.loads(cli(cache, "gc", "--dry-run").stdout)
    files = [p for p in (cache.data / "blobs").rglob("*") if p.is_file()]
    assert report["dry_run"] is True
    assert (report["blobs"], report["store_bytes"]) == (
        len(files),
        sum(p.stat().st_size for p in files),
    )


def test_readiness_follows_redis_and_liveness_does_not(tmp_path, upstream):
    own_redis = RedisServer(tmp_path / "redis").start()
    server = Gunicorn.with_config(
        tmp_path, own_redis.url, [{"name": "docker.io", "url": upstream.url}], workers=1
    )
    try:
        ready = requests.get(f"{server.url}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert ready.json()["checks"]["disk"]["free_bytes"] > 0
        own_redis.stop()
        # The checks run at most every 5 s per process: not ready within that.
        deadline = time.monotonic() + 8
        down = requests.get(f"{server.url}/readyz", timeout=30)
        while down.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
            down = requests.get(f"{server.url}/readyz", timeout=30)
        assert down.status_code == 503
        assert down.json()["checks"]["redis"]["ok"] is False
        assert "Redis" in down.json()["checks"]["redis"]["error"]
        assert requests.get(f"{server.url}/healthz", timeout=10).json()["status"] == "ok"
        assert requests.get(f"{server.url}/v2/", timeout=10).status_code == 200
    finally:
        server.stop()
        own_redis.stop()


def test_sigterm_lets_an_in_flight_blob_finish_and_commits_only_whole_files(
    tmp_path, redis_server, fake
):
    data = random.randbytes(3_000_000)
    digest = fake.add_blob("library/draining", data, trickle=0.03)  # about 1.4 s
    server = Gunicorn.with_config(
        tmp_path, redis_server.url, [{"name": "docker.io", "url": fake.url}], workers=1
    )
    try:
        with requests.get(
            f"{server.url}/v2/library/draining/blobs/{digest}", stream=True, timeout=30
        ) as response:
            chunks = response.iter_content(65536)
            first = next(chunks)
            os.kill(server.proc.pid, signal.SIGTERM)  # what `docker stop` / systemd send
            body = first + b"".join(chunks)
        assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]
        server.proc.wait(timeout=30)
        committed = tmp_path / "data" / "blobs" / "sha256" / digest[7:9] / digest[7:]
        assert committed.read_bytes() == data
        assert not [p for p in (tmp_path / "data" / "uploads").rglob("*") if p.is_file()]
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"{server.url}/v2/", timeout=5)
    finally:
        server.stop()


def test_date_header_is_current_and_well_formed(cache):
    # gunicorn's Date header is formatted once a second (registry/serving.py), never stale.
    seen = []
    for _ in range(2):
        response = requests.get(f"{cache.url}/v2/", timeout=10)
        seen.append(email.utils.parsedate_to_datetime(response.headers["Date"]).timestamp())
        assert abs(seen[-1] - time.time()) < 2
        time.sleep(1.1)
    assert seen[1] - seen[0] >= 1


def data_segments_received(sock: socket.socket) -> int:
    """tcpi_data_segs_in of the socket's TCP_INFO (Linux 4.6+): segments that carried data."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, 152)[0]


def test_a_cached_manifests_headers_and_body_arrive_in_one_segment(cache, images):
    # gunicorn sends headers and body in two send()s; registry/serving.py gathers a small
    # body with its headers (3-11% more cached manifests per second on loopback).
    image = images["busybox"]
    host, port = cache.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        request = (
            f"GET /v2/{image.repository}/manifests/{image.tag} HTTP/1.1\r\nHost: {host}\r\n"
            f"Accept: {ACCEPT['Accept']}\r\n\r\n"
        )
        sock.sendall(request.encode())
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(65536)
        head, _, body = response.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        while len(body) < length:
            body += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and length > 0
        assert hashlib.sha256(body).hexdigest() == image.digest.split(":")[1]
        assert data_segments_received(sock) == 1


def minor_faults(pids: list[int]) -> int:
    """Page faults the processes took that the kernel served from memory (fresh pages)."""
    return sum(int(proc_stat(pid)[7]) for pid in pids)  # minflt


def test_a_cold_fill_in_a_worker_uses_the_memory_of_its_freed_chunks_again(
    cache, upstream, token_server
):
    # Each MiB read of an upstream body is a new object; glibc gives the freed memory back
    # to the kernel and the next reads fault fresh pages in (a few us each on this VM), unless
    # registry/memory.py fixes its thresholds in the worker: measured, 16-1,114 faults for a
    # 128 MiB fill with them, 4,774-11,543 without.
    size = 128 << 20
    blob = random.Random(991).randbytes(size)
    image = single("admin/bigfill", "1", [Layer(blob, sha256(blob))], docker=True)
    Pusher(upstream.url, token_server.realm, token_server.service).push(image)
    requests.get(
        f"{cache.url}/v2/{image.repository}/manifests/1", headers=ACCEPT, timeout=30
    ).raise_for_status()
    workers = cache.worker_pids()
    before = minor_faults(workers)
    digest = hashlib.sha256()
    with requests.get(
        f"{cache.url}/v2/{image.repository}/blobs/{sha256(blob)}", stream=True, timeout=60
    ) as response:
        response.raise_for_status()
        for chunk in response.iter_content(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == sha256(blob).removeprefix("sha256:")
    faults = minor_faults(workers) - before
    assert faults < size // 4096 // 10, f"{faults} page faults for a {size >> 20} MiB fill"


def test_cached_blobs_go_out_by_sendfile_whole_and_in_ranges(cache, images):
    image = images["busybox"]
    digest = max(image.blobs, key=lambda d: len(image.blobs[d]))
    data = image.blobs[digest]
    url = f"{cache.url}/v2/{image.repository}/blobs/{digest}"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda _: requests.get(url, timeout=30).content, range(8)))
    assert all(body == data for body in bodies)
    middle = requests.get(url, headers={"Range": "bytes=1000-1999"}, timeout=30)
    assert middle.status_code == 206 and middle.content == data[1000:2000]
    tail = requests.get(url, headers={"Range": "bytes=-77"}, timeout=30)
    assert tail.status_code == 206 and tail.content == data[-77:]


def test_verify_skips_a_blob_a_sweep_deleted_after_the_listing(tmp_path):
    """`verify` over a store a running GC sweeps: a blob listed, then deleted before it is
    read, is skipped, neither counted nor a failure."""
    import io
    from types import SimpleNamespace

    from registry import admin
    from registry.digests import Digest
    from registry.store import ContentStore
    from registry.store.filesystem import FilesystemDriver

    store = ContentStore(FilesystemDriver(tmp_path / "data"))
    kept = b"a blob that stays"
    store.put_verified_bytes(Digest.parse("sha256:" + hashlib.sha256(kept).hexdigest()), kept)
    gone = Digest.parse("sha256:" + hashlib.sha256(b"swept").hexdigest())
    listed = list(store.iter_blobs())
    store.iter_blobs = lambda: iter([*listed, (gone, 5, 0.0)])  # listed, then deleted

    out = io.StringIO()
    assert admin.verify(SimpleNamespace(store=store), delete=False, out=out) == 0
    assert "verified 1 blobs, 0 corrupt" in out.getvalue()
