"""The compose stack a homelab operator runs: deploy/docker-compose.yml, unchanged, run with
Debian's docker-compose (1.29) and a test override only for what this machine needs (host
networking, the harness upstream's address, free ports; merged by `docker-compose config`,
as 1.29 cannot drop a port mapping in an override). Web, GC worker, scheduler and Redis
come up; skopeo and the Docker daemon (registry-mirrors pointing at the stack) pull through
it byte-exact; `docker-compose restart` and `down` + `up` keep every cached image, served
with the upstream stopped; the credentials file is mounted read-only and its secret is in no
`docker inspect`, no log and not in the image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
import requests
import yaml

from tests.support.clients import skopeo_copy, skopeo_policy
from tests.support.servers import ROOT, free_port, require

SECRET = "upstream-password-never-shown-7f3a"
REDIS_PASSWORD = "stack-redis-password-9c1e"


@pytest.fixture(scope="module")
def stack(docker, image, upstream, web_port, short):
    """The stack's directory: the compose file as shipped, its config and credentials
    beside it, .env, and the override; brought up, and down (volumes too) at the end."""
    directory = short / "stack"
    directory.mkdir()
    shutil.copy(ROOT / "deploy" / "docker-compose.yml", directory / "docker-compose.yml")
    redis_port = free_port()
    (directory / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "registries": [{"name": "docker.io", "url": upstream.url}],
                "credentials_file": "/etc/pullthrough/credentials.json",
            }
        )
    )
    host = upstream.url.removeprefix("http://")
    (directory / "credentials.json").write_text(
        json.dumps({"registry.example:5000": {"username": "someone", "password": SECRET}})
    )
    os.chmod(directory / "credentials.json", 0o644)  # read by the image's own user
    (directory / ".env").write_text(
        f"COMPOSE_PROJECT_NAME=ptdeploy\nREDIS_PASSWORD={REDIS_PASSWORD}\n"
    )
    redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_port}/0"
    on_host = {"network_mode": "host", "environment": {"REDIS_URL": redis_url}}
    override = {
        "services": {
            "redis": {
                "network_mode": "host",
                "command": [
                    "sh", "-c",
                    'exec redis-server --requirepass "$$REDIS_PASSWORD" --appendonly yes '
                    f"--save 60 1000 --bind 127.0.0.1 --port {redis_port}",
                ],
                "healthcheck": {
                    "test": ["CMD-SHELL", f'REDISCLI_AUTH="$$REDIS_PASSWORD" redis-cli -p '
                             f"{redis_port} ping | grep -q PONG"],
                    "interval": "2s",
                },
            },
            "web": {
                "network_mode": "host",
                "environment": {"REDIS_URL": redis_url,
                                "PULLTHROUGH_BIND": f"127.0.0.1:{web_port}"},
                "healthcheck": {
                    "test": ["CMD", "python", "-c", "import urllib.request,sys; sys.exit("
                             f"urllib.request.urlopen('http://127.0.0.1:{web_port}/readyz', "
                             "timeout=4).status != 200)"],
                    "interval": "2s",
                },
            },
            "gc-worker": on_host,
            "gc-scheduler": on_host,
        }
    }  # fmt: skip
    (directory / "docker-compose.test.yml").write_text(yaml.safe_dump(override))
    # docker-compose 1.29 cannot take a port mapping away in an override, and refuses one
    # beside host networking: the merged file, rendered by docker-compose itself, without it.
    merged = subprocess.run(
        [require("docker-compose"), "-f", "docker-compose.yml", "-f", "docker-compose.test.yml",
         "config"], cwd=directory, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    rendered = yaml.safe_load(merged)
    for service in rendered["services"].values():
        if service.get("network_mode") == "host":
            service.pop("ports", None)
    (directory / "docker-compose.rendered.yml").write_text(yaml.safe_dump(rendered))
    stack = Stack(directory, docker, web_port, redis_url, host)
    stack.compose("up", "-d", "--no-build")
    stack.wait_healthy()
    yield stack
    stack.compose("down", "--volumes", check=False)


class Stack:
    def __init__(self, directory: Path, docker, port: int, redis_url: str, upstream: str):
        self.directory = directory
        self.docker = docker
        self.url = f"http://127.0.0.1:{port}"
        self.host = f"127.0.0.1:{port}"
        self.redis_url = redis_url

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [require("docker-compose"), "-f", "docker-compose.rendered.yml", *args],
            cwd=self.directory, capture_output=True, text=True, timeout=600,
            env={**os.environ, "DOCKER_HOST": f"unix://{self.docker.socket}"},
        )  # fmt: skip
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    def containers(self) -> dict[str, dict]:
        ids = self.compose("ps", "-q").stdout.split()
        inspected = json.loads(self.docker.docker("inspect", *ids).stdout)
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in inspected}

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {
                name: c["State"].get("Health", {}).get("Status", c["State"]["Status"])
                for name, c in self.containers().items()
            }
            if states.get("web") == "healthy" and states.get("redis") == "healthy":
                return
            assert time.monotonic() < deadline, (states, self.compose("logs").stdout[-4000:])
            time.sleep(1)


def pull_with_skopeo(stack: Stack, image, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    skopeo_copy(
        skopeo_policy(work),
        f"{stack.host}/docker.io/{image.repository}:{image.tag}",
        work / "copy",
    )
    for digest, blob in image.blobs.items():
        assert (work / "copy" / digest.split(":")[1]).read_bytes() == blob


def test_every_role_comes_up_with_the_config_mounted(stack):
    containers = stack.containers()
    assert set(containers) == {"redis", "web", "gc-worker", "gc-scheduler"}
    assert all(c["State"]["Running"] for c in containers.values())
    assert requests.get(f"{stack.url}/readyz", timeout=10).status_code == 200
    # The GC worker registered with rq through the stack's Redis.
    client = redis.Redis.from_url(stack.redis_url)
    deadline = time.monotonic() + 60
    while not client.scard("rq:workers"):
        assert time.monotonic() < deadline, stack.compose("logs", "gc-worker").stdout[-3000:]
        time.sleep(1)
    mounts = {m["Destination"]: m for m in containers["web"]["Mounts"]}
    assert mounts["/etc/pullthrough/credentials.json"]["RW"] is False
    assert mounts["/etc/pullthrough/config.yaml"]["RW"] is False


def test_skopeo_and_the_docker_daemon_pull_through_the_stack(stack, images, tmp_path):
    pull_with_skopeo(stack, images["busybox"], tmp_path / "skopeo")
    image = images["multidocker"]
    done = stack.docker.docker("pull", f"{image.repository.removeprefix('library/')}:{image.tag}")
    assert done.returncode == 0
    assert "library/multidocker" in requests.get(f"{stack.url}/v2/_catalog", timeout=10).text


def test_restart_and_down_up_keep_every_cached_image(stack, images, upstream, tmp_path):
    image = images["alpine"]
    pull_with_skopeo(stack, image, tmp_path / "first")
    stack.compose("restart")
    stack.wait_healthy()
    upstream.stop()
    try:
        pull_with_skopeo(stack, image, tmp_path / "after-restart")
        stack.compose("down")
        stack.compose("up", "-d", "--no-build")
        stack.wait_healthy()
        pull_with_skopeo(stack, image, tmp_path / "after-down-up")
        pull_with_skopeo(stack, images["busybox"], tmp_path / "busybox-after-down-up")
    finally:
        upstream.start()


def test_the_credentials_secret_is_in_no_inspect_log_or_image(stack, images, tmp_path):
    pull_with_skopeo(stack, images["ocisingle"], tmp_path / "pull")
    inspected = stack.docker.docker("inspect", *stack.compose("ps", "-q").stdout.split()).stdout
    assert SECRET not in inspected
    logs = stack.compose("logs").stdout
    assert "Booting worker" in logs  # the logs are there to read
    assert SECRET not in logs and REDIS_PASSWORD not in logs
    saved = tmp_path / "image.tar"
    stack.docker.docker("save", "-o", str(saved), "pullthrough:latest")
    tail = b""
    with open(saved, "rb") as f:
        while chunk := f.read(16 << 20):
            assert SECRET.encode() not in tail + chunk
            tail = chunk[-len(SECRET) :]
