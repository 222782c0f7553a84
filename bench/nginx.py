"""nginx serving pullthrough's own blob files with sendfile: the physical limit for warm blobs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.servers import free_port, require, stop, wait_for_port


class Nginx:
    """nginx on 127.0.0.1 serving `<root>/blobs/...` as static files (sendfile on)."""

    def __init__(self, workdir: Path, root: Path, workers: int) -> None:
        self.workdir = workdir
        self.root = root
        self.workers = workers
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def blob_url(self, digest: str) -> str:
        algorithm, hexpart = digest.split(":")
        return f"{self.url}/blobs/{algorithm}/{hexpart[:2]}/{hexpart}"

    def start(self) -> Nginx:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # As root nginx drops its workers to an unprivileged user, which cannot read the
        # benchmark's private temporary directory: keep them as the invoking user.
        user = "user root;" if os.geteuid() == 0 else ""
        config = self.workdir / "nginx.conf"
        config.write_text(
            f"""{user}
daemon off;
worker_processes {self.workers};
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {self.workdir}/body;
    proxy_temp_path {self.workdir}/proxy;
    fastcgi_temp_path {self.workdir}/fastcgi;
    uwsgi_temp_path {self.workdir}/uwsgi;
    scgi_temp_path {self.workdir}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
    }}
}}
"""
        )
        self.proc = subprocess.Popen(
            [require("nginx"), "-p", str(self.workdir), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "stderr.log", "ab"),  # noqa: SIM115 - owned by the process
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc:
            stop(self.proc, timeout=5)
