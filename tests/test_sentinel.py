"""Redis Sentinel: nodes find the master through the sentinels and follow a failover.

A real master, a real replica and a real sentinel (redis-server in sentinel mode), the data
servers and the sentinel each with their own password, and a gunicorn node configured with
`redis.sentinels`: it fills through the master, and after the master is killed and the
sentinel promotes the replica, it serves what it cached and fills new content with its leases
on the new master.
"""

from __future__ import annotations

import signal
import time

import pytest
import redis as redis_lib
import requests

from registry.mediatypes import MANIFEST_TYPES
from tests.support.servers import Gunicorn, RedisSentinel, RedisServer

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}


# As deployed: the data servers and the sentinels each have their own password.
DATA_PASSWORD = "data-secret"
SENTINEL_PASSWORD = "sentinel-secret"


@pytest.fixture
def sentinel_set(tmp_path):
    master = RedisServer(tmp_path / "master", password=DATA_PASSWORD).start()
    replica = RedisServer(
        tmp_path / "replica", replica_of=master.port, password=DATA_PASSWORD
    ).start()
    sentinel = RedisSentinel(
        tmp_path / "sentinel",
        master.port,
        password=SENTINEL_PASSWORD,
        master_password=DATA_PASSWORD,
    ).start()
    yield master, replica, sentinel
    for server in (sentinel, replica, master):
        server.stop()


def fill_keys(port: int) -> set[str]:
    client = redis_lib.Redis(host="127.0.0.1", port=port, password=DATA_PASSWORD)
    try:
        return {k.decode() for k in client.scan_iter("pt:fill:*")}
    finally:
        client.close()


def test_node_follows_a_sentinel_failover(tmp_path, sentinel_set, upstream, images):
    master, replica, sentinel = sentinel_set
    node = Gunicorn.with_config(
        tmp_path / "node",
        "redis://ignored-when-sentinels-are-set:1/0",
        [{"name": "docker.io", "url": upstream.url}],
        workers=2,
        redis={
            "url": f"redis://:{DATA_PASSWORD}@127.0.0.1/0",
            "sentinels": [f"127.0.0.1:{sentinel.port}"],
            "master": sentinel.name,
            "sentinel_password": SENTINEL_PASSWORD,
        },
    )
    try:
        before, after = images["busybox"], images["ocisingle"]

        def pull(image) -> None:
            base = f"{node.url}/v2/{image.repository}"
            response = requests.get(f"{base}/manifests/{image.tag}", headers=ACCEPT, timeout=30)
            assert response.status_code == 200 and response.content == image.manifest
            for digest, data in image.blobs.items():
                got = requests.get(f"{base}/blobs/{digest}", timeout=30)
                assert got.status_code == 200 and got.content == data

        pull(before)
        assert {f"pt:fill:{d}" for d in before.blobs} <= fill_keys(master.port)

        master.proc.send_signal(signal.SIGKILL)
        master.proc.wait()
        deadline = time.monotonic() + 30
        while sentinel.master_port_now() != replica.port:
            assert time.monotonic() < deadline, "the sentinel did not promote the replica"
            time.sleep(0.2)

        pull(before)  # cached: served as before
        deadline = time.monotonic() + 30
        while True:  # the node's pooled connections to the dead master fail once, then move
            try:
                pull(after)
                break
            except AssertionError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert {f"pt:fill:{d}" for d in after.blobs} <= fill_keys(replica.port)
    finally:
        node.stop()


def test_a_worker_that_finds_no_master_says_which_sentinels_it_asked(tmp_path):
    """The GC worker starts while the Sentinels know no master (all down, or mid-failover):
    its one line names the master and the Sentinels asked, not a host and port."""
    import yaml

    from tests.support.servers import free_port, run_module

    port = free_port()  # nobody listens: no Sentinel answers
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"root": str(tmp_path / "data")},
                "redis": {
                    "url": "redis://127.0.0.1/0",
                    "sentinels": [f"127.0.0.1:{port}"],
                    "master": "pt",
                },
            }
        )
    )
    run = run_module("workers", config, "worker", check=False, timeout=60)
    assert run.returncode == 1
    assert f"Redis at master 'pt' (Sentinels 127.0.0.1:{port}) is unreachable" in run.stderr
