"""deploy/ checked without a Docker engine: the compose file, the Dockerfile and the systemd
units start the same three roles as the Procfile, with persistence, health checks, the
credentials read-only and never in the image."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import yaml

from registry.config import settings_from_mapping
from tests.support.servers import ROOT, require

DEPLOY = ROOT / "deploy"


def procfile() -> dict[str, str]:
    roles = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip():
            name, _, command = line.partition(":")
            roles[name.strip()] = command.strip()
    return roles


def test_procfile_names_the_three_roles():
    assert set(procfile()) == {"web", "gc-worker", "gc-scheduler"}


def test_compose_runs_every_role_with_redis_volumes_and_health_checks():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "web", "gc-worker", "gc-scheduler"}
    for role, command in procfile().items():
        assert " ".join(services[role]["command"]) == command, role
        assert (
            "./credentials.json:/etc/pullthrough/credentials.json:ro" in services[role]["volumes"]
        )
        assert "data:/var/lib/pullthrough" in services[role]["volumes"]
        assert services[role]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert set(compose["volumes"]) == {"data", "redis"}
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "redis:/data" in redis["volumes"]
    # A password, from the environment (.env), used by the server, its check and the roles.
    assert '--requirepass "$$REDIS_PASSWORD"' in command
    assert "REDIS_PASSWORD:?" in redis["environment"]["REDIS_PASSWORD"]
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][-1]
    assert "redis-cli ping" in redis["healthcheck"]["test"][-1]
    for role in procfile():
        assert services[role]["environment"]["REDIS_URL"].startswith(
            "redis://:${REDIS_PASSWORD:?"
        ), role
    assert "/readyz" in " ".join(services["web"]["healthcheck"]["test"])
    assert services["web"]["ports"] == ["5050:5050"]
    assert services["web"]["environment"]["PULLTHROUGH_STORAGE_ROOT"] == "/var/lib/pullthrough"


def test_dockerfile_is_pinned_non_root_and_carries_no_credentials():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    copied = " ".join(re.findall(r"^COPY (.+)$", text, re.M))
    assert "credentials" not in copied and "config.yaml " not in copied
    cmd = json.loads(re.search(r"^CMD (\[.+\])$", text, re.M).group(1))  # exec form is JSON
    assert " ".join(cmd) == procfile()["web"]
    assert "/readyz" in re.search(r"HEALTHCHECK.*?CMD (.+)$", text, re.M | re.S).group(1)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "credentials.json" in ignored and "deploy/credentials.json" in ignored


def test_systemd_units_run_the_procfile_commands():
    units = {
        "web": "pullthrough-web.service",
        "gc-worker": "pullthrough-gc-worker.service",
        "gc-scheduler": "pullthrough-gc-scheduler.service",
    }
    for role, unit in units.items():
        text = (DEPLOY / "systemd" / unit).read_text()
        exec_start = re.search(r"^ExecStart=(.+)$", text, re.M).group(1)
        command = exec_start.replace("/opt/pullthrough/.venv/bin/", "")
        assert command == procfile()[role], unit
        assert re.search(r"^User=pullthrough$", text, re.M)
    web = (DEPLOY / "systemd" / "pullthrough-web.service").read_text()
    assert "TimeoutStopSec=75" in web  # longer than graceful_timeout: streams can finish


def test_the_gunicorn_config_scales_with_cpus_and_drains_gracefully():
    text = (DEPLOY / "gunicorn.conf.py").read_text()
    assert 'worker_class = "gevent"' in text
    assert "multiprocessing.cpu_count()" in text
    assert "graceful_timeout" in text and "prompt_graceful_stop" in text


def test_cluster_example_runs_two_nodes_on_one_bucket_behind_a_balancer():
    cluster = DEPLOY / "cluster"
    compose = yaml.safe_load((cluster / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "minio", "bucket-setup", "node-a", "node-b", "balancer"} <= set(services)
    assert services["balancer"]["ports"] == ["5050:5050"]
    nginx = (cluster / "nginx.conf").read_text()
    assert "server node-a:5050" in nginx and "server node-b:5050" in nginx
    assert "proxy_buffering off" in nginx
    # The nodes' config is valid and names the bucket the setup job creates.
    raw = yaml.safe_load((cluster / "config.yaml").read_text())
    assert raw.pop("credentials_file") == "/etc/pullthrough/credentials.json"  # mounted there
    settings = settings_from_mapping(raw, env={})
    assert settings.s3 is not None and settings.s3.bucket == "pullthrough"
    assert "store/pullthrough" in services["bucket-setup"]["command"][0]
    assert "uploads/" in services["bucket-setup"]["command"][0]


@pytest.mark.parametrize("compose", ["docker-compose.yml", "cluster/docker-compose.yml"])
def test_debians_docker_compose_accepts_each_compose_file(tmp_path, compose):
    """docker-compose 1.29 (Debian 12's) reads the file as shipped: it refused a top-level
    `name:` until .env's COMPOSE_PROJECT_NAME took its place."""
    path = DEPLOY / compose
    env = {**os.environ, "REDIS_PASSWORD": "x", "COMPOSE_PROJECT_NAME": "check"}
    done = subprocess.run(
        [require("docker-compose"), "-f", str(path), "config", "--quiet"],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
