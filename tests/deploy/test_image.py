"""The image: built from deploy/Dockerfile unchanged by the Docker daemon, it runs as a
non-root user, answers /healthz on its own with the example config, and holds no config or
credentials but the example's; its size is reported."""

from __future__ import annotations

import json
import time

import requests

from tests.support.servers import free_port


def test_the_image_runs_as_a_non_root_user_and_answers_healthz(docker, image):
    inspected = json.loads(docker.docker("image", "inspect", image).stdout)[0]
    assert inspected["Config"]["User"] == "pullthrough"
    assert docker.docker("run", "--rm", image, "id", "-u").stdout.strip() == "10001"
    listed = docker.docker("run", "--rm", image, "ls", "/etc/pullthrough").stdout.split()
    assert listed == ["config.yaml"]  # the example: no credentials baked in
    port = free_port()
    name = "pt-image-healthz"
    docker.docker(
        "run", "-d", "--name", name, "--network", "host",
        "-e", f"PULLTHROUGH_BIND=127.0.0.1:{port}", "-e", "REDIS_URL=redis://127.0.0.1:1/0",
        image,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, docker.docker("logs", name).stderr
                time.sleep(0.5)
        assert answer.status_code == 200
    finally:
        docker.docker("rm", "-f", name, check=False)
    size = inspected["Size"]
    print(f"\nimage {image}: {size / 2**20:.0f} MiB")
