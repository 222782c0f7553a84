"""Real servers for the tests, all on 127.0.0.1: Redis, CNCF distribution behind a Docker-Hub-like
token service, gunicorn running pullthrough, and small fakes for faults a real registry cannot
produce."""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[2]


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name: [0] the state, [7] minflt,
    [11] utime, [12] stime (proc(5)'s fields 3 on). OSError once the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def require(binary: str) -> str:
    path = shutil.which(binary) or (
        f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None
    )
    if not path:
        raise RuntimeError(f"{binary} is not installed: run `make test`, which installs it")
    return path


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Every key name found in a test Redis before it was flushed or stopped, over the whole run:
# test_redis_keys checks each against the documented key schema. With several test processes
# (pytest-xdist) each also appends what it found to the file KEYS_FILE names, which
# tests/conftest.py sets up and checks once every process is done.
KEYS_SEEN: set[str] = set()
KEYS_FILE = "PULLTHROUGH_KEYS_SEEN"


def record_keys(url: str, password: str | None = None) -> None:
    import redis as redis_lib

    with contextlib.suppress(redis_lib.RedisError):
        client = redis_lib.Redis.from_url(url, password=password, socket_timeout=2)
        found = {key.decode() for key in client.scan_iter(count=1000)}
        client.close()
        new = found - KEYS_SEEN
        KEYS_SEEN.update(found)
        shared = os.environ.get(KEYS_FILE)
        if shared and new:
            with open(shared, "a") as handle:  # one write: appends do not interleave
                handle.write("".join(f"{key}\n" for key in sorted(new)))


def keys_seen() -> set[str]:
    """The keys this process saw, and every other test process too (where they share)."""
    shared = os.environ.get(KEYS_FILE)
    if not shared or not os.path.exists(shared):
        return set(KEYS_SEEN)
    with open(shared) as handle:
        return KEYS_SEEN | {line.strip() for line in handle if line.strip()}


class RedisServer:
    def __init__(
        self, workdir: Path, replica_of: int | None = None, password: str | None = None
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.replica_of = replica_of  # the port of the master this one replicates
        self.password = password  # requirepass, and masterauth for a replica

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                require("redis-server"),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *(["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []),
                *(
                    ["--requirepass", self.password, "--masterauth", self.password]
                    if self.password
                    else []
                ),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc:
            if self.proc.poll() is None:
                record_keys(self.url, self.password)
            stop(self.proc)


class RedisSentinel:
    """One Redis Sentinel (redis-server in sentinel mode) watching the master on
    `master_port`, quick to fail over: the master is down after `down_after_ms` of silence
    (500 ms)."""

    def __init__(
        self,
        workdir: Path,
        master_port: int,
        name: str = "pt",
        *,
        password: str | None = None,
        master_password: str | None = None,
        quorum: int = 1,
        down_after_ms: int = 500,
    ) -> None:
        self.workdir = workdir
        self.master_port = master_port
        self.name = name
        self.quorum = quorum  # sentinels that must agree the master is down
        self.down_after_ms = down_after_ms  # silence that makes the master down
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.password = password  # the sentinel's own requirepass
        self.master_password = master_password

    def start(self) -> RedisSentinel:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "sentinel.conf"  # sentinel rewrites it as it learns
        config.write_text(
            f"bind 127.0.0.1\nport {self.port}\ndir {self.workdir}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.name} 5000\n"
            + (f"requirepass {self.password}\n" if self.password else "")
            + (
                f"sentinel auth-pass {self.name} {self.master_password}\n"
                if self.master_password
                else ""
            )
        )
        self.proc = subprocess.Popen(
            [require("redis-server"), str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def master_port_now(self) -> int:
        import redis

        client = redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2
        )
        try:
            _host, port = client.sentinel_get_master_addr_by_name(self.name)
            return int(port)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)


class LoopbackHTTP:
    """A threaded HTTP server on 127.0.0.1 inside the test process."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()


def send_json(handler: BaseHTTPRequestHandler, status: int, data: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)


# -- token service --
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer(LoopbackHTTP):
    """A Docker-Hub-like token service issuing RS256 JWTs that distribution verifies.

    Anonymous users may pull anything but `private/*`; `reader` may pull everything;
    `admin` may also push. Requests are counted per scope for assertions.
    """

    USERS = {"admin": "adminpw", "reader": "readerpw"}

    def __init__(self, workdir: Path, service: str = "pt-test-registry") -> None:
        super().__init__()
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.service = service
        self.issuer = "pt-test-issuer"
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pt-test-token")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path = workdir / "token.crt"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[dict] = []
        self.fail_with: int | None = None
        self.expires_in = 300

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, claims: dict) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"

    def grant(self, user: str | None, scopes: list[str]) -> list[dict]:
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            name, wanted = ":".join(parts[1:-1]), parts[-1].split(",")
            allowed = {"pull"} if user else ({"pull"} if not name.startswith("private/") else set())
            if user == "admin":
                allowed = {"pull", "push", "delete", "*"}
            actions = [a for a in wanted if a in allowed]
            if actions:
                access.append({"type": "repository", "name": name, "actions": actions})
        return access

    def start(self) -> TokenServer:
        server_ref = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    raw = base64.b64decode(auth[6:]).decode()
                    name, _, password = raw.partition(":")
                    if server_ref.USERS.get(name) != password:
                        return self._send(401, {"details": "bad credentials"})
                    user = name
                scopes = query.get("scope", [])
                server_ref.requests.append({"user": user, "scopes": scopes})
                if server_ref.fail_with:
                    return self._send(server_ref.fail_with, {"details": "token service failing"})
                now = int(time.time())
                claims = {
                    "iss": server_ref.issuer,
                    "sub": user or "",
                    "aud": query.get("service", [server_ref.service])[0],
                    "exp": now + server_ref.expires_in,
                    "nbf": now - 10,
                    "iat": now,
                    "jti": uuid.uuid4().hex,
                    "access": server_ref.grant(user, scopes),
                }
                token = server_ref.sign(claims)
                self._send(
                    200,
                    {"token": token, "access_token": token, "expires_in": server_ref.expires_in},
                )

            def _send(self, status, body):
                send_json(self, status, json.dumps(body).encode())

        self._serve(Handler)
        return self


# -- CNCF distribution --
_ACCESS = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[0-9.]+" (\d{3})')
# The same lines with the body bytes distribution sent (combined log format).
_ACCESS_BYTES = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[0-9.]+" \d{3} (\d+|-)')


class Distribution:
    """Debian's docker-registry (CNCF distribution 2.8), optionally behind the token server."""

    def __init__(
        self,
        workdir: Path,
        token: TokenServer | None = None,
        proxy_of: str | None = None,
        basic: tuple[str, str] | None = None,
    ):
        self.workdir = workdir
        self.token = token
        self.proxy_of = proxy_of
        self.basic = basic  # HTTP Basic auth (htpasswd) for this user instead of tokens
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "registry.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.workdir / 'storage'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
        ]
        if self.token:
            lines += [
                "auth:",
                "  token:",
                f"    realm: {self.token.realm}",
                f"    service: {self.token.service}",
                f"    issuer: {self.token.issuer}",
                f"    rootcertbundle: {self.token.cert_path}",
            ]
        if self.basic:
            htpasswd = self.workdir / "htpasswd"
            line = subprocess.run(
                [require("htpasswd"), "-Bbn", *self.basic],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            htpasswd.write_text(line + "\n")
            lines += ["auth:", "  htpasswd:", "    realm: pt-basic", f"    path: {htpasswd}"]
        if self.proxy_of:
            lines += ["proxy:", f"  remoteurl: {self.proxy_of}"]
        return "\n".join(lines) + "\n"

    def start(self) -> Distribution:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(self.config())
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [require("docker-registry"), "serve", str(config)], stdout=log, stderr=log
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)

    def requests_seen(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request distribution has logged so far."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [(m, p, int(s)) for m, p, s in _ACCESS.findall(text)]

    def mark(self) -> int:
        return len(self.requests_seen())

    def body_bytes_since(self, mark: int, part: str) -> int:
        """Body bytes distribution logged for the GETs since `mark` whose path has `part`."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        rows = _ACCESS_BYTES.findall(text)[mark:]
        return sum(int(n) for m, p, n in rows if m == "GET" and part in p and n != "-")

    def requests_since(self, mark: int) -> list[tuple[str, str, int]]:
        return self.requests_seen()[mark:]


def module_env(config: Path) -> dict[str, str]:
    # PULLTHROUGH_CONFIG names the config; a REDIS_URL from the caller's shell must not win.
    env = {**os.environ, "PULLTHROUGH_CONFIG": str(config)}
    env.pop("REDIS_URL", None)
    return env


def start_module(module: str, config: Path, *args: str, **popen) -> subprocess.Popen:
    """`python -m <module> args...` from the project root with PULLTHROUGH_CONFIG=config, in
    the background."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=module_env(config), **popen
    )


def run_module(
    module: str,
    config: Path,
    *args: str,
    check: bool = True,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python -m <module> args...` from the project root with PULLTHROUGH_CONFIG=config (and
    no REDIS_URL from the caller's environment, `env` added), to its end."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**module_env(config), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


# -- pullthrough under gunicorn --
class Gunicorn:
    def __init__(
        self,
        config_path: Path,
        workdir: Path,
        workers: int = 3,
        env: dict | None = None,
        command: tuple[str, ...] = ("-c", str(ROOT / "deploy" / "gunicorn.conf.py")),
        app: str = "wsgi:app",
    ):
        self.config_path = config_path
        # gunicorn's arguments before the app: the Procfile's by default.
        self.command = command
        self.app = app
        self.workdir = workdir
        self.workers = workers
        self.port = free_port()
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "gunicorn.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Gunicorn:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            PULLTHROUGH_CONFIG=str(self.config_path),
            PULLTHROUGH_BIND=f"127.0.0.1:{self.port}",
            PULLTHROUGH_WORKERS=str(self.workers),
            PROMETHEUS_MULTIPROC_DIR=str(self.workdir / "prom"),
        )
        env.update(self.env)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                *self.command,
                self.app,
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for_port(self.port, timeout=30, proc=self.proc)
        return self

    @classmethod
    def with_config(
        cls,
        workdir: Path,
        redis_url: str,
        registries: list[dict],
        workers: int = 3,
        env: dict | None = None,
        command: tuple[str, ...] | None = None,
        **sections,
    ) -> Gunicorn:
        """Write a config (data under workdir/data, plus any other `sections`) and start."""
        import yaml

        config = {
            "storage": {"root": str(workdir / "data")},
            "redis": {"url": redis_url},
            "registries": registries,
            **sections,
        }
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        extra = {} if command is None else {"command": command}
        server = cls(path, workdir, workers=workers, env=env, **extra).start()
        server.data = workdir / "data"
        return server

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        )
        return [int(p) for p in out.stdout.split()]

    def stop(self) -> None:
        if self.proc:
            stop(self.proc, timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# How far behind the clock a link's bucket may fall and catch up: a relay thread that wakes
# late (its process waits for a core under load) would otherwise lose that time from the
# link. Without it one connection of a 25 MiB/s relay got 15-16 MiB/s while six processes
# kept both cores busy (22.7 idle); with 50 ms, 25 as it should.
LINK_SLACK = 0.05


class _Bucket:
    """One token bucket: when `n` more bytes may pass."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next_free = time.monotonic()

    def reserve(self, n: int, now: float) -> float:
        start = max(now - LINK_SLACK, self.next_free)
        self.next_free = start + n / self.rate
        return self.next_free


class ThrottledRelay:
    """A TCP relay on loopback in front of a real server, as a WAN link in front of Docker Hub:
    bytes flowing back to the client share one token bucket of `mib_per_s`, and are counted
    (`bytes_down`) so a benchmark can prove how much an upstream really sent. With
    `per_connection_mibps`, each connection also has a bucket of its own, as a CDN that
    limits what one connection gets."""

    def __init__(
        self, target_port: int, mib_per_s: float, per_connection_mibps: float | None = None
    ) -> None:
        self.target_port = target_port
        self.rate = mib_per_s * (1 << 20)
        self.per_connection = per_connection_mibps * (1 << 20) if per_connection_mibps else None
        self.port = free_port()
        self.bytes_down = 0
        self.connections = 0  # accepted: each is one attempt to reach the server behind
        self._lock = threading.Lock()
        self._next_free = time.monotonic()
        self._stopping = False
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spend(self, n: int, own: _Bucket | None) -> None:
        # Reserve a slot on the shared link (and the connection's own), then sleep until then.
        with self._lock:
            now = time.monotonic()
            start = max(now - LINK_SLACK, self._next_free)
            ready = self._next_free = start + n / self.rate
            if own is not None:
                ready = max(ready, own.reserve(n, now))
            self.bytes_down += n
        if ready > now:
            time.sleep(ready - now)

    def _request_editor(self) -> Callable[[bytes], bytes] | None:
        """What changes the bytes a connection's client sends (none: a faithful link)."""
        return None

    def _pump(self, src: socket.socket, dst: socket.socket, throttle: bool) -> None:
        own = _Bucket(self.per_connection) if throttle and self.per_connection else None
        edit = None if throttle else self._request_editor()
        try:
            while True:
                data = src.recv(64 << 10)
                if not data:
                    break
                if throttle:
                    self._spend(len(data), own)
                elif edit is not None:
                    data = edit(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # Shut down and close both: after a mere shutdown Linux keeps taking the server's
            # writes, so a server whose client died would stream on into nothing for tens of
            # seconds (and log the request only then).
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for args in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def start(self) -> ThrottledRelay:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            self._listener.close()


class Containerd:
    """Debian's containerd on a private socket and root (CRI off), for `ctr` pulls."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.address = str(workdir / "containerd.sock")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Containerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.workdir / "root"}"\n'
            f'state = "{self.workdir / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n'
        )
        log = open(self.workdir / "containerd.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [require("containerd"), "--config", str(config)], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 20
        while not Path(self.address).exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start: see {self.workdir}/containerd.log")
            time.sleep(0.1)
        return self

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [require("ctr"), "--address", self.address, "--namespace", "pt", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)
