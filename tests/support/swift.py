"""A real S3 server on loopback: OpenStack Swift (Debian's packages) with s3api and tempauth.

One proxy, one account, one container and one object server, each a process of Debian's
python3 with its own config directory (Swift reads `/etc/swift/swift.conf` unless told
otherwise: `_LAUNCH` points it at ours before anything loads it), rings built with
swift-ring-builder over one plain directory (`mount_check = false`), and memcached for
tempauth's tokens and the proxy's caches. S3 credentials: `test:tester` / `testing`.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path

from tests.support.servers import free_port, require, stop, wait_for_port

ACCESS_KEY = "test:tester"
SECRET_KEY = "testing"
REGION = "us-east-1"

# Runs under Debian's python3 (where the swift package lives): argv = swift.conf, server conf.
_LAUNCH = """
import sys
from swift.common import utils
utils.SWIFT_CONF_FILE = sys.argv[1]
from swift.common import constraints, storage_policy
storage_policy.reload_storage_policies()
constraints.reload_constraints()
from swift.common.wsgi import run_wsgi
sys.exit(run_wsgi(sys.argv[2], sys.argv[3], verbose=True))
"""

_SERVERS = ("account", "container", "object")
# s3api before tempauth (it checks S3 signatures through it); slo and copy carry multipart
# uploads and UploadPartCopy.
PROXY_PIPELINE = (
    "catch_errors gatekeeper proxy-logging cache listing_formats s3api tempauth copy slo dlo "
    "proxy-logging proxy-server"
)


class Swift:
    def __init__(self, workdir: Path, workers: int = 1) -> None:
        self.dir = workdir / "swift"
        self.workers = workers  # processes of each server (the proxy's carry the S3 API)
        self.ports = {name: free_port() for name in (*_SERVERS, "proxy", "memcached")}
        self.procs: dict[str, subprocess.Popen] = {}
        # The proxy's access log, as syslog lines over UDP: the truth of what was read.
        self.access: list[str] = []
        self._access_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._access_sock.bind(("127.0.0.1", 0))
        self.access_port = self._access_sock.getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"

    def _configure(self) -> None:
        devices = self.dir / "devices"
        (devices / "d1").mkdir(parents=True, exist_ok=True)
        (self.dir / "swift.conf").write_text(
            textwrap.dedent("""\
                [swift-hash]
                swift_hash_path_suffix = pullthrough-tests
                swift_hash_path_prefix = pullthrough-tests
                [storage-policy:0]
                name = gold
                default = yes
                """)
        )
        common = textwrap.dedent(f"""\
            [DEFAULT]
            bind_ip = 127.0.0.1
            workers = {self.workers}
            user = {os.environ.get("USER") or "root"}
            swift_dir = {self.dir}
            devices = {devices}
            mount_check = false
            log_level = WARNING
            log_udp_host = 127.0.0.1
            log_udp_port = 9
            """)
        builder = require("swift-ring-builder")
        for name in _SERVERS:
            (self.dir / f"{name}-server.conf").write_text(
                common
                + f"bind_port = {self.ports[name]}\n"
                + textwrap.dedent(f"""\
                    [pipeline:main]
                    pipeline = {name}-server
                    [app:{name}-server]
                    use = egg:swift#{name}
                    [{name}-replicator]
                    [{name}-updater]
                    [{name}-auditor]
                    """)
            )
            ring = str(self.dir / f"{name}.builder")
            for args in (
                ("create", "6", "1", "1"),
                ("add", f"r1z1-127.0.0.1:{self.ports[name]}/d1", "100"),
                ("rebalance",),
            ):
                result = subprocess.run(
                    [builder, ring, *args], capture_output=True, text=True, timeout=60
                )
                # rebalance exits 1 for "balanced, with warnings" (one device, one replica).
                if result.returncode not in (0, 1):
                    raise RuntimeError(f"swift-ring-builder {args}: {result.stdout}{result.stderr}")
        (self.dir / "proxy-server.conf").write_text(
            common
            + f"bind_port = {self.ports['proxy']}\n"
            + textwrap.dedent(f"""\
                [pipeline:main]
                pipeline = {PROXY_PIPELINE}
                [app:proxy-server]
                use = egg:swift#proxy
                account_autocreate = true
                [filter:catch_errors]
                use = egg:swift#catch_errors
                [filter:gatekeeper]
                use = egg:swift#gatekeeper
                [filter:proxy-logging]
                use = egg:swift#proxy_logging
                access_log_udp_host = 127.0.0.1
                access_log_udp_port = {self.access_port}
                access_log_level = INFO
                [filter:cache]
                use = egg:swift#memcache
                memcache_servers = 127.0.0.1:{self.ports["memcached"]}
                [filter:listing_formats]
                use = egg:swift#listing_formats
                [filter:s3api]
                use = egg:swift#s3api
                location = {REGION}
                [filter:tempauth]
                use = egg:swift#tempauth
                user_test_tester = {SECRET_KEY} .admin
                [filter:copy]
                use = egg:swift#copy
                [filter:slo]
                use = egg:swift#slo
                [filter:dlo]
                use = egg:swift#dlo
                """)
        )

    def _receive_access_log(self) -> None:
        while True:
            try:
                data = self._access_sock.recv(65536)
            except OSError:
                return
            self.access.append(data.decode(errors="replace"))

    def object_gets(self, key: str) -> int:
        """Clients' GETs of the object whose key ends with `key` that sent its bytes (200 or
        206, or 499: the client went away mid-body), as the proxy logged them so far (a
        request logs when it ends; the proxy's own subrequests, which log no client address,
        are not counted: a large object's segments, the source of a server-side copy)."""
        quoted = re.escape(urllib.parse.quote(key))
        needle = re.compile(
            rf"proxy-server: \d\S* .* GET /\S*/{quoted} HTTP/[0-9.]+ (?:200|206|499) "
        )
        return sum(1 for line in self.access if needle.search(line))

    def object_heads(self, key: str) -> int:
        """Clients' HEADs of the object whose key ends with `key`, found or not, as logged
        so far."""
        return self.object_requests("HEAD", key)

    def object_requests(self, method: str, key: str) -> int:
        """Clients' requests of `method` for the object whose key ends with `key`, whatever
        the answer, as logged so far."""
        quoted = re.escape(urllib.parse.quote(key))
        needle = re.compile(rf"proxy-server: \d\S* .* {method} /\S*/{quoted} HTTP/[0-9.]+ \d{{3}} ")
        return sum(1 for line in self.access if needle.search(line))

    def part_puts(self, key: str) -> list[int]:
        """The part numbers of clients' part uploads and copies into a multipart upload of
        the object whose key ends with `key`, in the order logged so far."""
        quoted = re.escape(urllib.parse.quote(key))
        needle = re.compile(
            rf"proxy-server: \d\S* .* PUT /\S*/{quoted}%3FuploadId%3D\S*?partNumber%3D(\d+) HTTP/"
        )
        return [int(m.group(1)) for line in self.access if (m := needle.search(line))]

    def start(self) -> Swift:
        self.dir.mkdir(parents=True, exist_ok=True)
        threading.Thread(target=self._receive_access_log, daemon=True).start()
        self._configure()
        log = open(self.dir / "swift.log", "ab")  # noqa: SIM115 (the processes keep it)
        self.procs["memcached"] = subprocess.Popen(
            [
                require("memcached"),
                "-l",
                "127.0.0.1",
                "-p",
                str(self.ports["memcached"]),
                "-U",
                "0",
                "-m",
                "32",
                "-u",
                os.environ.get("USER") or "root",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for name in (*_SERVERS, "proxy"):
            self._spawn(name)
        for name, proc in self.procs.items():
            wait_for_port(self.ports[name], 30, proc)
        self._wait_ready()
        return self

    def _spawn(self, name: str) -> None:
        log = open(self.dir / "swift.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.procs[name] = subprocess.Popen(
            [
                "/usr/bin/python3",
                "-c",
                _LAUNCH,
                str(self.dir / "swift.conf"),
                str(self.dir / f"{name}-server.conf"),
                f"{name}-server",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop_endpoint(self) -> None:
        """The S3 endpoint goes away (the proxy stops; the data stays)."""
        stop(self.procs["proxy"])

    def start_endpoint(self) -> None:
        """The S3 endpoint back on its port."""
        self._spawn("proxy")
        wait_for_port(self.ports["proxy"], 30, self.procs["proxy"])
        self._wait_ready()

    def _wait_ready(self) -> None:
        # The proxy answers before its rings and backends are usable: ask until a listing works.
        client = self.client()
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def client(self):
        from registry.store.s3 import s3_client

        return s3_client(self.endpoint, ACCESS_KEY, SECRET_KEY, REGION)

    def create_bucket(self, name: str) -> str:
        # Right after start the container server may still answer 503 ("reduce your request
        # rate") while the account is created: ask again for a while.
        client = self.client()
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=name)
                return name
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        for proc in self.procs.values():
            stop(proc)
        self._access_sock.close()

    def log(self) -> str:
        return (self.dir / "swift.log").read_text(errors="replace")
