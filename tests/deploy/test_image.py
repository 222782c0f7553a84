"""The image: built from deploy/Dockerfile unchanged by the Docker daemon, it runs as a
non-root user, answers /healthz on its own with the example config, and holds no config or
credentials but the example's; its size is reported. What goes wrong reads as one line in
the container's log: a missing config file or a wrong key stops the web and the worker
(exit 2), Redis out of reach is named by the web (unhealthy) and stops the worker (exit 1),
a data volume the image's user cannot write is named (unhealthy)."""

from __future__ import annotations

import json
import time

import pytest
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


# -- what an operator reads when it goes wrong -------------------------------------------


def container_log(docker, name: str) -> str:
    done = docker.docker("logs", name, check=False)
    return done.stdout + done.stderr


def wait_exit(docker, name: str, timeout: float = 60) -> int:
    done = docker.docker("wait", name, check=False)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def wait_health(docker, name: str, want: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = json.loads(docker.docker("inspect", name).stdout)[0]["State"]
        if state.get("Health", {}).get("Status") == want:
            return
        assert time.monotonic() < deadline, (state, container_log(docker, name))
        time.sleep(1)


def run_web(docker, image, name: str, *options: str, command: tuple[str, ...] = ()) -> None:
    docker.docker(
        "run", "-d", "--name", name, "--network", "host", "--health-interval", "2s",
        "-e", f"PULLTHROUGH_BIND=127.0.0.1:{free_port()}", *options, image, *command,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("a missing config file", "PULLTHROUGH_CONFIG: cannot read /etc/pullthrough/missing.yaml"),
        ("a config with a wrong key", "registres: Unknown field."),
    ],
)
def test_a_bad_config_stops_the_container_with_the_problem_in_its_log(
    docker, image, tmp_path, case, said
):
    name = f"pt-bad-config-{case.split()[-1]}"
    config = tmp_path / "config.yaml"
    config.write_text("registres: []\n")
    config.chmod(0o644)
    options = (
        ("-e", "PULLTHROUGH_CONFIG=/etc/pullthrough/missing.yaml")
        if case == "a missing config file"
        else ("-v", f"{config}:/etc/pullthrough/config.yaml:ro")
    )
    try:
        for command in ((), ("python", "-m", "workers", "worker")):
            docker.docker("rm", "-f", name, check=False)
            run_web(docker, image, name, *options, command=command)
            assert wait_exit(docker, name) == 2
            log = container_log(docker, name)
            assert said in log, log
            assert "Traceback" not in log, log
    finally:
        docker.docker("rm", "-f", name, check=False)


def test_redis_out_of_reach_is_named_by_the_web_and_stops_the_worker(docker, image):
    name = "pt-no-redis"
    redis_url = ("-e", "REDIS_URL=redis://:secret-not-shown@127.0.0.1:1/0")
    try:
        run_web(docker, image, name, *redis_url)
        wait_health(docker, name, "unhealthy")
        log = container_log(docker, name)
        assert "Redis at 127.0.0.1:1 is unreachable" in log, log
        assert "secret-not-shown" not in log
        docker.docker("rm", "-f", name)
        run_web(docker, image, name, *redis_url, command=("python", "-m", "workers", "worker"))
        assert wait_exit(docker, name) == 1
        log = container_log(docker, name)
        assert "Redis at 127.0.0.1:1 is unreachable" in log and "Traceback" not in log, log
    finally:
        docker.docker("rm", "-f", name, check=False)


def test_a_data_volume_the_image_user_cannot_write_is_named(docker, image, tmp_path, redis_server):
    name = "pt-read-only-data"
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # root's: uid 10001 cannot write
    try:
        run_web(docker, image, name, "-v", f"{data}:/var/lib/pullthrough",
                "-e", f"REDIS_URL={redis_server.url}")  # fmt: skip
        wait_health(docker, name, "unhealthy")
        log = container_log(docker, name)
        assert (
            "the storage /var/lib/pullthrough is not writable by uid 10001 (Permission denied)"
            in log
        ), log
    finally:
        docker.docker("rm", "-f", name, check=False)
