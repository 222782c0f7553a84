"""What `make test-deploy` runs on: a Docker daemon of its own (tests/support/clients.py
Dockerd), the base images the Dockerfile and the compose file name, made here (Docker Hub is
out of reach): a Debian bookworm root from Debian's mirror (debootstrap, minbase) with Python
3.11, pip and Redis, shaped as the official images are (no EXTERNALLY-MANAGED marker, a
`python` link, this machine's CA bundle for PyPI), imported under both names; and the
pullthrough image built from deploy/Dockerfile unchanged. The same root stands in for the
cluster example's nginx (Debian's nginx-light)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.support.clients import Dockerd
from tests.support.servers import ROOT, free_port, require

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
PYTHON_BASE = next(
    line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("FROM ")
)
REDIS_BASE = COMPOSE["services"]["redis"]["image"]
CLUSTER = yaml.safe_load((ROOT / "deploy" / "cluster" / "docker-compose.yml").read_text())
NGINX_BASE = CLUSTER["services"]["balancer"]["image"]
IMAGE = COMPOSE["x-pullthrough"]["image"]
MIRROR = "http://deb.debian.org/debian"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("check", True)
    return subprocess.run(command, capture_output=True, text=True, timeout=1800, **kwargs)


@pytest.fixture(scope="session")
def short():  # this session's: the daemon and the stack live for all its tests
    """A short directory: dockerd's containerd socket path must fit in 108 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="pt-deploy-", dir="/tmp"))
    yield directory
    # What dockerd left mounted there (a host-network container's netns), deepest first.
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(f"{directory}/")]
    for point in sorted(points, key=len, reverse=True):
        run("umount", "-l", point, check=False)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def web_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def docker(short, web_port):
    """The daemon that builds the image, runs the stack and pulls through it."""
    daemon = Dockerd(short / "docker", f"http://127.0.0.1:{web_port}").start()
    yield daemon
    for container in daemon.docker("ps", "-aq", check=False).stdout.split():
        daemon.docker("rm", "-f", container, check=False)
    daemon.stop()


def debootstrap_root(directory: Path) -> Path:
    root = directory / "rootfs"
    run(
        require("debootstrap"), "--variant=minbase",
        "--include=python3.11,python3-pip,python3-venv,ca-certificates,passwd,"
        "redis-server,redis-tools,nginx-light",
        "bookworm", str(root), MIRROR,
    )  # fmt: skip
    # As the official python image has them: pip may install into the system's Python, and
    # `python` is Python 3.
    for marker in (root / "usr" / "lib").glob("python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    (root / "usr" / "bin" / "python").symlink_to("python3")
    # TLS to PyPI is intercepted on this machine: its CA bundle, as the host's pip uses.
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    return root


@pytest.fixture(scope="session")
def image(docker, short) -> str:
    """The pullthrough image from deploy/Dockerfile, on base images made here."""
    have = set(docker.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split())
    if not {PYTHON_BASE, REDIS_BASE, NGINX_BASE} <= have:
        root = debootstrap_root(short / "base")
        for tag, cmd in (
            (PYTHON_BASE, '["python3"]'),
            (REDIS_BASE, '["redis-server"]'),
            (NGINX_BASE, '["nginx", "-g", "daemon off;"]'),
        ):
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run(
                ["/usr/bin/docker", "-H", f"unix://{docker.socket}", "import",
                 "--change", f"ENV PATH={PATH}",
                 "--change", f"CMD {cmd}", "-", tag],
                stdin=tar.stdout, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            tar.wait()
            assert imported.returncode == 0, imported.stderr
        shutil.rmtree(root, ignore_errors=True)
    built = subprocess.run(
        ["/usr/bin/docker", "-H", f"unix://{docker.socket}", "build", "--network", "host",
         "-f", str(DOCKERFILE), "-t", IMAGE, str(ROOT)],
        capture_output=True, text=True, timeout=1800,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return IMAGE
