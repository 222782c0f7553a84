"""The cluster example, deploy/cluster/, brought up the same way: its compose file unchanged
with docker-compose 1.29, an override for this machine (host networking, a port per node and
for the balancer, the harness upstream), and Swift (tests/support/swift.py) in MinIO's place
(MinIO's two services left as placeholders: no image of theirs is in reach). The example's
nginx.conf with its node addresses swapped for the nodes' ports balances two nodes on one
bucket and one Redis; one image pulled through the balancer twice fetches each of its bytes
from the upstream once, and both nodes answered."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import redis
import requests
import yaml

from tests.conftest import SWIFT_BUCKET
from tests.deploy.conftest import PYTHON_BASE
from tests.support.clients import skopeo_copy, skopeo_policy
from tests.support.servers import ROOT, free_port, require

REDIS_PASSWORD = "cluster-redis-password-5d2b"


@pytest.fixture(scope="module")
def cluster(docker, image, upstream, swift, short):
    from tests.support.swift import ACCESS_KEY, REGION, SECRET_KEY

    directory = short / "cluster" / "cluster"
    directory.mkdir(parents=True)
    for name in ("docker-compose.yml", "nginx.conf"):
        shutil.copy(ROOT / "deploy" / "cluster" / name, directory / name)
    ports = {"node-a": free_port(), "node-b": free_port(), "balancer": free_port()}
    redis_port = free_port()
    nginx = (directory / "nginx.conf").read_text()
    nginx = nginx.replace("node-a:5050", f"127.0.0.1:{ports['node-a']}")
    nginx = nginx.replace("node-b:5050", f"127.0.0.1:{ports['node-b']}")
    nginx = nginx.replace("listen 5050;", f"listen 127.0.0.1:{ports['balancer']};")
    (directory / "nginx.conf").write_text(nginx)
    example = yaml.safe_load((ROOT / "deploy" / "cluster" / "config.yaml").read_text())
    example["storage"]["s3"].update(
        endpoint=swift.endpoint, bucket=SWIFT_BUCKET, region=REGION, prefix="deploy-cluster"
    )
    example["registries"] = [{"name": "docker.io", "url": upstream.url}]
    (directory / "config.yaml").write_text(yaml.safe_dump(example))
    (directory.parent / "credentials.json").write_text("{}\n")
    (directory / ".env").write_text(
        f"COMPOSE_PROJECT_NAME=ptcluster\nREDIS_PASSWORD={REDIS_PASSWORD}\n"
    )
    redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_port}/0"
    node_env = {"REDIS_URL": redis_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY}  # fmt: skip
    placeholder = {"image": PYTHON_BASE, "network_mode": "host"}
    services = {
        "redis": {
            "network_mode": "host",
            "command": ["sh", "-c", 'exec redis-server --requirepass "$$REDIS_PASSWORD" '
                        f"--bind 127.0.0.1 --port {redis_port}"],
            "healthcheck": {"test": ["CMD-SHELL", f'REDISCLI_AUTH="$$REDIS_PASSWORD" '
                                     f"redis-cli -p {redis_port} ping | grep -q PONG"],
                            "interval": "2s"},
        },
        "minio": {**placeholder, "command": ["sleep", "infinity"],
                  "healthcheck": {"test": ["CMD", "true"], "interval": "2s"}},
        "bucket-setup": {**placeholder, "entrypoint": ["true"], "command": []},
        "balancer": {"network_mode": "host"},
        "gc-worker": {"network_mode": "host", "environment": node_env},
        "gc-scheduler": {"network_mode": "host", "environment": node_env},
    }  # fmt: skip
    for node in ("node-a", "node-b"):
        services[node] = {
            "network_mode": "host",
            "environment": {**node_env, "PULLTHROUGH_BIND": f"127.0.0.1:{ports[node]}"},
            "healthcheck": {
                "test": ["CMD", "python", "-c", "import urllib.request,sys; sys.exit("
                         f"urllib.request.urlopen('http://127.0.0.1:{ports[node]}/readyz', "
                         "timeout=4).status != 200)"],
                "interval": "2s",
            },
        }  # fmt: skip
    (directory / "docker-compose.test.yml").write_text(yaml.safe_dump({"services": services}))
    compose = [require("docker-compose")]
    env = {**os.environ, "DOCKER_HOST": f"unix://{docker.socket}"}
    merged = subprocess.run(
        [*compose, "-f", "docker-compose.yml", "-f", "docker-compose.test.yml", "config"],
        cwd=directory, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr
    rendered = yaml.safe_load(merged.stdout)
    for service in rendered["services"].values():
        service.pop("ports", None)  # all on the host's network (as in test_compose.py)
    (directory / "docker-compose.rendered.yml").write_text(yaml.safe_dump(rendered))

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*compose, "-f", "docker-compose.rendered.yml", *args],
            cwd=directory, capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    run("up", "-d", "--no-build")
    deadline = time.monotonic() + 120
    while True:
        try:
            if all(
                requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
                for port in ports.values()
            ):
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, run("logs").stdout[-5000:]
        time.sleep(1)
    yield {"ports": ports, "redis_url": redis_url, "run": run}
    subprocess.run([*compose, "-f", "docker-compose.rendered.yml", "down", "--volumes"],
                   cwd=directory, capture_output=True, timeout=300, env=env)  # fmt: skip


def test_one_image_through_the_balancer_is_fetched_from_upstream_once(
    cluster, upstream, images, tmp_path
):
    image = images["big"]  # a 48 MiB layer: its fill is the one both nodes would want
    mark = upstream.mark()
    balancer = f"127.0.0.1:{cluster['ports']['balancer']}"
    ref = f"{balancer}/docker.io/{image.repository}:{image.tag}"
    for n in range(2):  # twice: round robin hands the requests to both nodes
        skopeo_copy(skopeo_policy(tmp_path), ref, tmp_path / f"copy-{n}")
        for digest, blob in image.blobs.items():
            assert (tmp_path / f"copy-{n}" / digest.split(":")[1]).read_bytes() == blob
    # One fill per blob, by whichever node got there first (a big one in parallel ranges):
    # each byte came from the upstream once.
    for digest, blob in image.blobs.items():
        assert upstream.body_bytes_since(mark, digest) == len(blob), digest
    # Both nodes answered (each node's Hosts table rows are in the one Redis: one per
    # address and engine, so count each node's own access through its log instead).
    logs = cluster["run"]("logs", "node-a", "node-b").stdout
    answered = {line.split("|")[0].strip() for line in logs.splitlines()
                if "registry.access request" in line and "status=200" in line}  # fmt: skip
    assert len(answered) == 2, answered
    assert redis.Redis.from_url(cluster["redis_url"]).scard("rq:workers") >= 1
