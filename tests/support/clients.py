"""Real registry clients driven by the tests: skopeo, podman and the Docker daemon."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

import requests

from tests.support.servers import require


def skopeo_policy(directory: Path) -> Path:
    path = directory / "policy.json"
    path.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return path


def skopeo_copy(
    policy: Path, source: str, dest: Path, *creds: str, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess:
    """`skopeo copy --all docker://source dir:dest` over plain HTTP, without retries."""
    return subprocess.run(
        [
            require("skopeo"),
            "--policy",
            str(policy),
            "copy",
            "--all",
            "--retry-times",
            "0",
            "--src-tls-verify=false",
            *creds,
            f"docker://{source}",
            f"dir:{dest}",
        ],
        check=check,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tls_hello(port: int) -> None:
    """A client that speaks TLS to a plain HTTP port on loopback: its handshake fails."""
    context = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            context.wrap_socket(raw, server_hostname="127.0.0.1")
        except (ssl.SSLError, OSError):
            return
    raise AssertionError("a TLS handshake with a plain HTTP port succeeded")


def fetch(url: str, **kwargs) -> tuple[int, bytes, bool]:
    """(status, body, complete) of a streamed GET: complete is False when the body was cut
    short; (-1, b"", False) when the connection broke before the body could be read."""
    try:
        with requests.get(url, stream=True, timeout=60, **kwargs) as response:
            body = b"".join(response.iter_content(1 << 16))
            expected = response.headers.get("Content-Length")
            return response.status_code, body, expected is None or int(expected) == len(body)
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
        return -1, b"", False


class Podman:
    """Debian's podman with its own root, runroot, storage driver (vfs) and registries.conf
    (CONTAINERS_REGISTRIES_CONF): nothing of the machine's own podman set-up is used."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        # podman refuses a runroot of more than 50 characters (a test process's own temp dir
        # under pytest-xdist is longer): a short one of its own, under /tmp.
        self.runroot = Path(tempfile.mkdtemp(prefix="pt-podman-", dir="/tmp"))
        self.conf = workdir / "registries.conf"
        (workdir / "containers.conf").write_text(
            '[engine]\nevents_logger = "file"\ncgroup_manager = "cgroupfs"\n'
        )

    def mirror(self, routes: dict[str, str]) -> None:
        """registries.conf: each prefix (`docker.io`) gets the cache location as its mirror
        (`insecure = true`: plain HTTP). The registry's own location is a dead loopback port,
        so a pull the mirror cannot serve fails here instead of reaching the internet."""
        blocks = ['unqualified-search-registries = ["docker.io"]']
        for prefix, mirror in routes.items():
            blocks.append(
                f'[[registry]]\nprefix = "{prefix}"\nlocation = "127.0.0.1:1/{prefix}"\n'
                f'insecure = true\n[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true'
            )
        self.conf.write_text("\n\n".join(blocks) + "\n")

    def close(self) -> None:
        shutil.rmtree(self.runroot, ignore_errors=True)

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "CONTAINERS_REGISTRIES_CONF": str(self.conf),
            "CONTAINERS_CONF": str(self.workdir / "containers.conf"),
        }
        base = [require("podman"), "--root", str(self.workdir / "root")]
        base += ["--runroot", str(self.runroot), "--storage-driver", "vfs"]
        return subprocess.run(
            [*base, *args], env=env, capture_output=True, text=True, timeout=timeout
        )


class Dockerd:
    """Debian's Docker daemon (docker.io) with everything of its own: data and exec roots,
    pid file and socket; no iptables, no bridge, vfs storage, the cache as registry-mirror.
    Its registry traffic that the mirror does not take (Docker falls back to Docker Hub) goes
    to a dead loopback proxy, never to the internet."""

    def __init__(self, workdir: Path, mirror: str) -> None:
        self.workdir = workdir
        self.mirror = mirror
        self.socket = workdir / "docker.sock"
        self.log_path = workdir / "dockerd.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Dockerd:
        import time

        self.workdir.mkdir(parents=True, exist_ok=True)
        dead_proxy = "http://127.0.0.1:1"
        env = {
            **os.environ,
            "HTTP_PROXY": dead_proxy,
            "HTTPS_PROXY": dead_proxy,
            "NO_PROXY": "127.0.0.1,localhost",
        }
        w = self.workdir
        args = [
            *("--data-root", str(w / "data"), "--exec-root", str(w / "exec")),
            *("--pidfile", str(w / "docker.pid"), "-H", f"unix://{self.socket}"),
            *("--iptables=false", "--ip6tables=false", "--bridge=none"),
            *("--storage-driver=vfs", f"--registry-mirror={self.mirror}"),
        ]
        self.proc = subprocess.Popen(
            [require("dockerd"), *args],
            env=env,
            stdout=open(self.log_path, "ab"),  # noqa: SIM115 - owned by the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while self.docker("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start: see {self.log_path}")
            time.sleep(0.2)
        return self

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # The CLI of the same package (another `docker` may come first on PATH).
        cli = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else require("docker")
        return subprocess.run(
            [cli, "-H", f"unix://{self.socket}", *args],
            capture_output=True,
            text=True,
            timeout=180,
            check=check,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            from tests.support.servers import stop

            stop(self.proc, timeout=30)
