"""Faults on our side, against real gunicorn: Redis down or restarted empty, the disk filling up
mid-fill, a worker killed while it serves, an upstream whose name does not resolve. After each:
what the client saw, what is on disk (`verify` clean, no partial served), and that cached
images still pull byte-identical."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from registry import create_app
from tests.conftest import make_settings
from tests.support.clients import fetch, skopeo_copy, skopeo_policy
from tests.support.images import Pusher
from tests.support.servers import (
    ROOT,
    Distribution,
    Gunicorn,
    RedisServer,
    ThrottledRelay,
    run_module,
)

pytestmark = pytest.mark.usefixtures("forget_upstream_health")

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}


def take(chunks) -> bytes:
    """Whatever arrives until the stream ends or breaks."""
    got = bytearray()
    try:
        for chunk in chunks:
            got += chunk
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
        pass
    return bytes(got)


def verify_clean(cache: Gunicorn) -> None:
    config = cache.config_path
    done = run_module("registry", config, "verify", check=False)
    assert done.returncode == 0 and " 0 corrupt" in done.stdout, done.stdout + done.stderr
    partials = [p for p in (cache.data / "uploads").rglob("*") if p.is_file()]
    assert partials == []


def pull_files(policy: Path, ref: str, dest: Path) -> dict[str, bytes]:
    done = skopeo_copy(policy, ref, dest, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    return {p.name: p.read_bytes() for p in dest.iterdir() if p.name != "version"}


def test_redis_down_cached_images_pull_identical_uncached_fail_cleanly_then_recover(
    tmp_path, upstream, images
):
    own_redis = RedisServer(tmp_path / "redis").start()
    # tag_ttl and referrers_ttl 0: every tag or referrers request wants its (Redis) lease
    # and asks upstream.
    cache = Gunicorn.with_config(
        tmp_path,
        own_redis.url,
        [{"name": "docker.io", "url": upstream.url, "tag_ttl": 0, "referrers_ttl": 0}],
        workers=2,
    )
    policy = skopeo_policy(tmp_path)
    busybox, alpine = images["busybox"], images["alpine"]
    ref = f"127.0.0.1:{cache.port}/{busybox.repository}:{busybox.tag}"
    try:
        before = pull_files(policy, ref, tmp_path / "before")
        own_redis.stop()
        started = time.monotonic()
        during = pull_files(policy, ref, tmp_path / "during")
        assert during == before
        assert time.monotonic() - started < 10
        # A referrers list is asked of upstream without its lease, as a tag is.
        listed = requests.get(
            f"{cache.url}/v2/{busybox.repository}/referrers/{busybox.digest}", timeout=30
        )
        assert listed.status_code == 200 and listed.json()["manifests"] == []
        # Content never cached needs a lease to fill: refused at once with an OCI error.
        layer = next(iter(alpine.children[0].blobs))
        url = f"{cache.url}/v2/library/alpine/blobs/{layer}"
        started = time.monotonic()
        response = requests.get(url, timeout=30)
        assert response.status_code == 503
        assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert time.monotonic() - started < 10
        own_redis.start()  # back, empty
        assert requests.get(f"{cache.url}/v2/library/alpine/manifests/3.19", timeout=30).ok
        status, body, complete = fetch(url)
        assert status == 200 and complete
        assert body == alpine.children[0].blobs[layer]
        assert pull_files(policy, ref, tmp_path / "after") == before
        verify_clean(cache)
    finally:
        cache.stop()
        own_redis.stop()


def test_redis_restarted_empty_mid_fill_never_yields_wrong_bytes(tmp_path, fake):
    own_redis = RedisServer(tmp_path / "redis").start()
    data = random.randbytes(4_000_000)
    digest = fake.add_blob("library/midfill", data, trickle=0.02)  # about 1.3 s
    cache = Gunicorn.with_config(
        tmp_path,
        own_redis.url,
        [{"name": "docker.io", "url": fake.url}],
        workers=2,
        upstream={"connect_timeout": 1, "read_timeout": 3, "lease_ttl": 2},
    )
    url = f"{cache.url}/v2/library/midfill/blobs/{digest}"
    try:
        with requests.get(url, stream=True, timeout=60) as response:
            chunks = response.iter_content(1 << 16)
            got = next(chunks)
            own_redis.stop()
            own_redis.start()
            got += take(chunks)
        # Either all of it, verified, or a prefix of the truth: never other bytes.
        assert data.startswith(got)
        for _ in range(10):  # as Docker retries a broken layer
            status, body, complete = fetch(url)
            if status == 200 and complete:
                break
            time.sleep(0.5)
        assert hashlib.sha256(body).hexdigest() == digest[7:]
        verify_clean(cache)
    finally:
        cache.stop()
        own_redis.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 8 MiB tmpfs as the storage root (`make test` runs as root in CI, as it installs
    Debian packages; without the right to mount, this fails loudly rather than skipping)."""
    mount = tmp_path / "data"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_mid_fill_fails_cleanly_and_serving_resumes_with_space(
    tmp_path, redis_server, redis_client, fake, small_disk
):
    small = random.randbytes(200_000)
    small_digest = fake.add_blob("library/disk", small)
    big = random.randbytes(12_000_000)  # more than the disk holds
    big_digest = fake.add_blob("library/disk", big)
    cache = Gunicorn.with_config(
        tmp_path, redis_server.url, [{"name": "docker.io", "url": fake.url}]
    )
    base = f"{cache.url}/v2/library/disk/blobs"
    try:
        assert fetch(f"{base}/{small_digest}")[1] == small
        status, body, complete = fetch(f"{base}/{big_digest}")
        assert not (status == 200 and complete), "12 MB cannot fit on an 8 MiB disk"
        if status == 200:
            assert big.startswith(body)  # a prefix of the truth at most
        elif status > 0:  # refused before the first byte (else: cut short, status -1)
            assert status == 503 and b"storage" in body, body
        # The fill failed as ours, not upstream's, and dropped its partial to free the space.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = redis_client.hgetall(f"pt:fill:{big_digest}")
            if state.get(b"state") == b"failed":
                break
            time.sleep(0.1)
        assert state[b"reason"] == b"storage_error", state
        assert b"storage" in state[b"error_message"]
        assert not list((small_disk / "uploads").rglob("*.*")) and not [
            p for p in (small_disk / "uploads").rglob("*") if p.is_file()
        ]
        status, again, complete = fetch(f"{base}/{small_digest}")
        assert status == 200 and again == small  # cached content still served
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
        status, body, complete = fetch(f"{base}/{big_digest}")
        assert status == 200 and complete and body == big
        verify_clean(cache)
    finally:
        cache.stop()


def test_storage_failing_before_a_joined_clients_first_byte_is_a_503(
    tmp_path, redis_server, redis_client, fake, small_disk
):
    # The disk is full to the last byte. Upstream is slow to start its body, so the client
    # joins the fill while it streams (its size known) and waits for a first byte that never
    # comes: every attempt fails at its first write. What it gets is the storage's 503, as a
    # client that saw the failure at once would, not an upstream error.
    with open(small_disk / "ballast", "wb") as ballast, contextlib.suppress(OSError):
        while True:
            ballast.write(b"\0" * 65536)
            ballast.flush()
    data = random.randbytes(300_000)
    digest = fake.add_blob("library/fullfirst", data, body_delay=0.3)
    cache = Gunicorn.with_config(
        tmp_path, redis_server.url, [{"name": "docker.io", "url": fake.url}]
    )
    try:
        status, body, _ = fetch(f"{cache.url}/v2/library/fullfirst/blobs/{digest}")
        assert status == 503, body
        error = json.loads(body)["errors"][0]
        assert error["code"] == "UNAVAILABLE" and "storage" in error["message"], error
        assert fake.count("GET", digest) > 1  # the client did join a streaming fill
        # And its access line says so (not left waiting for a last byte that never goes).
        time.sleep(0.5)
        assert any(
            f"digest={digest}" in line and "status=503" in line
            for line in cache.log().splitlines()
            if "registry.access" in line
        ), cache.log()[-3000:]
    finally:
        cache.stop()


def test_worker_killed_mid_serve_cuts_the_stream_and_the_next_pull_is_whole(
    tmp_path, redis_server, fake
):
    data = random.randbytes(64 << 20)
    digest = fake.add_blob("library/killserve", data)
    cache = Gunicorn.with_config(
        tmp_path, redis_server.url, [{"name": "docker.io", "url": fake.url}], workers=1
    )
    url = f"{cache.url}/v2/library/killserve/blobs/{digest}"
    try:
        assert fetch(url)[1] == data  # cached
        with requests.get(url, stream=True, timeout=60) as response:
            chunks = response.iter_content(1 << 16)
            got = next(chunks)
            (worker,) = cache.worker_pids()
            os.kill(worker, signal.SIGKILL)
            got += take(chunks)
        assert len(got) < len(data) and data.startswith(got)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # gunicorn starts a new worker
            status, body, complete = fetch(url)
            if status == 200:
                break
            time.sleep(0.2)
        assert complete and body == data
        verify_clean(cache)
    finally:
        cache.stop()


def test_an_upstream_whose_name_does_not_resolve_fails_fast_and_is_named(
    tmp_path, redis_server, redis_client
):
    settings = make_settings(
        tmp_path / "data",
        redis_server.url,
        "http://pullthrough-test.invalid:5000",
        connect_timeout=2,
    )
    client = create_app(settings).test_client()
    for path in ("/v2/library/busybox/manifests/1", "/v2/library/busybox/blobs/sha256:" + "a" * 64):
        started = time.monotonic()
        response = client.get(path, headers=ACCEPT)
        assert time.monotonic() - started < 5
        assert response.status_code in (502, 503), response.data
        message = response.json["errors"][0]["message"]
        assert "docker.io" in message or "pullthrough-test.invalid" in message, message


def test_service_returns_within_seconds_of_the_upstream_and_a_dead_one_gets_few_probes(
    tmp_path, token_server, images
):
    """An uncached pull succeeds within 5 s of a stopped distribution coming back, while
    during the outage all workers together send it at most one probe per probe interval."""
    own = Distribution(tmp_path / "upstream", token=token_server).start()
    image = images["busybox"]
    Pusher(own.url, token_server.realm, token_server.service).push(image)
    # A link in front of it counts every connection the cache opens towards it.
    link = ThrottledRelay(own.port, 1000).start()
    own_redis = RedisServer(tmp_path / "redis").start()
    cache = Gunicorn.with_config(
        tmp_path / "cache",
        own_redis.url,
        [{"name": "docker.io", "url": link.url}],
        workers=3,
        upstream={"breaker_backoff": 60, "breaker_probe_interval": 2, "connect_timeout": 2},
    )
    url = f"{cache.url}/v2/{image.repository}/manifests/{image.tag}"
    try:
        own.stop()
        outage_started = time.monotonic()
        connections_before = link.connections
        statuses = []
        while time.monotonic() - outage_started < 8:
            statuses.append(requests.get(url, headers=ACCEPT, timeout=30))
            time.sleep(0.1)
        outage = time.monotonic() - outage_started
        probes = link.connections - connections_before
        assert {r.status_code for r in statuses} == {503}
        # Opening the breaker takes breaker_failures (5) attempts; then one probe per 2 s.
        assert probes <= 5 + outage / 2 + 1, probes
        refused = statuses[-1]
        assert refused.reason.startswith("docker.io unreachable (")
        assert "not cached" in refused.reason
        assert 1 <= int(refused.headers["Retry-After"]) <= 2
        # The first ones too, before the breaker opened: each says when to come back.
        assert all(1 <= int(r.headers["Retry-After"]) <= 2 for r in statuses[:5])
        assert all("retry in" in r.reason for r in statuses[:5])

        own.start()
        back = time.monotonic()
        while True:
            answer = requests.get(url, headers=ACCEPT, timeout=30)
            if answer.status_code == 200 or time.monotonic() - back > 10:
                break
            time.sleep(0.1)
        assert answer.status_code == 200 and answer.content == image.manifest
        assert time.monotonic() - back <= 5
    finally:
        cache.stop()
        link.stop()
        own.stop()
        own_redis.stop()


def test_a_node_stopped_as_its_workers_boot_stops_without_waiting_out_the_grace(
    tmp_path, redis_server
):
    """SIGTERM right after the start (a restart straight after a crash, a rollout) on a
    loaded machine, where a new worker runs late: the signal reached it before it set up
    its own, was lost, and the worker served on until graceful_timeout and was then killed
    mid-transfer. Here each new worker sleeps before its post_fork (deploy's runs after)."""
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(
        f"exec(open({str(ROOT / 'deploy' / 'gunicorn.conf.py')!r}).read())\n"
        "_post_fork = post_fork\n"
        "def post_fork(server, worker):\n"
        "    import time\n"
        "    time.sleep(1)  # not scheduled yet: the machine is busy\n"
        "    _post_fork(server, worker)\n"
    )
    node = Gunicorn.with_config(
        tmp_path, redis_server.url, [{"name": "docker.io", "url": "http://127.0.0.1:9"}],
        workers=2, env={"PULLTHROUGH_GRACEFUL_TIMEOUT": "20"}, command=("-c", str(config)),
    )  # fmt: skip
    node.stop()
    booted = node.log().count("Booting worker")
    node.start()
    deadline = time.monotonic() + 20
    while node.log().count("Booting worker") < booted + 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    began = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    node.proc.wait(timeout=40)
    assert time.monotonic() - began < 12, "a booting worker waited out graceful_timeout"
