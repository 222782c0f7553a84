"""`make soak-cluster`: several nodes on one bucket and a Redis with Sentinels, under load,
while faults arrive on a schedule. Writes its section of docs/reliability.md.

The site: three pullthrough nodes (gunicorn, gevent workers) on one S3 bucket (the local
Swift of the tests) with a local tier each, configured from deploy/cluster/config.yaml,
behind nginx configured from deploy/cluster/nginx.conf (round robin); Redis as a master, a
replica and three Sentinels; the GC worker and its scheduler (sweeps every minute, the
follower's ticks: `soak/moving:latest` followed); the upstream (distribution behind its
token server) behind a relay that caps its bandwidth.

The load: SOAK_CLIENTS clients (150) for SOAK_SECONDS (600), every byte checked (manifests
against the pushed bytes or their digest, blobs hashed, ranges against the known bytes,
referrers against the attached artifacts): hot tags and digests, blobs whole and in ranges,
big blobs, referrers, tag lists, and cold multi-platform images pushed every few seconds
while `soak/moving:latest` moves upstream.

The faults, each on the schedule several times (once in the short run): a node SIGKILLed
mid-fill and restarted; a node's gunicorn stopped gracefully and started; the Redis master
SIGKILLed (the Sentinels fail over) and brought back as a replica; the S3 endpoint stopped;
the upstream stopped; a node's tier directory deleted under it; a GC sweep that evicts, while
clients herd onto a cold image.

Every failed request is attributed to the last fault whose window (its action, then its
bound) holds it; one outside every window fails the run, as do wrong bytes, leases or fill
records left at the end, a verify that finds corrupt blobs, a tier copy the bucket does not
hold or whose bytes are wrong, and a fault that took longer than its bound to recover.
SOAK_RESULT names a JSON file for the figures (the test of the short run reads it).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
import requests
import yaml
from redis.sentinel import Sentinel
from requests.adapters import HTTPAdapter

from bench.load import ACCEPT
from bench.proc import rss_mib
from bench.progress import say
from bench.report import write_section
from registry.digests import Digest
from registry.store import paths
from tests.support.cosign import Key, sbom_image, signature_image, tag_schema_index
from tests.support.images import Image, Pusher, index, make_layer, single, standard_images
from tests.support.servers import (
    ROOT,
    Distribution,
    Gunicorn,
    RedisSentinel,
    RedisServer,
    ThrottledRelay,
    TokenServer,
    free_port,
    require,
    run_module,
    stop,
    wait_for_port,
)
from tests.support.swift import ACCESS_KEY, REGION, SECRET_KEY, Swift

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "150"))
SHORT = SECONDS < 300  # the short version in make test: each fault once, shorter outages
NODES = ("node-a", "node-b", "node-c")
NODE_WORKERS = 1 if SHORT else 2  # the short run shares make test's two cores
LINK_MIBPS = 40.0
BUCKET = "pullthrough-soak"
MASTER = "pt"
PUSH_EVERY = 3.0 if SHORT else 5.0
TAG_TTL = 10
S3_OUTAGE = 4.0 if SHORT else 20.0
UPSTREAM_OUTAGE = 6.0 if SHORT else 30.0
BIG = (24 if SHORT else 64) << 20  # the layer a node is killed in the middle of filling
SWEEP_PATIENCE = 900.0  # for the evicting sweep, waits for a scheduled one included
BACKGROUND = ("gc-evict",)  # faults that run while the next ones arrive
SWEEP_RETRY = 10.0  # between tries of the evicting sweep while another sweep runs

# How long after a fault's action ends its failures may go on (the bound of its window),
# and why failures are expected at all.
BOUNDS = {
    "node-kill": 15.0,
    "graceful-restart": 5.0,
    "redis-failover": 20.0,
    "s3-stop": 15.0,
    "upstream-stop": 15.0,
    "tier-delete": 5.0,
    "gc-evict": 5.0,
}
WHY = {
    "node-kill": "transfers the killed node was sending are cut (nginx cannot retry a "
    "response it began); its fills are taken over by the other nodes after lease_ttl",
    "graceful-restart": "none expected: the node finishes what it serves, nginx sends new "
    "requests to the others",
    "redis-failover": "requests needing Redis get 503 until the Sentinels promote the "
    "replica and the nodes' connections move to it",
    "s3-stop": "what is not in the node's tier (manifests, blobs, fills' pieces) cannot be "
    "read or stored: 503 until the endpoint is back",
    "upstream-stop": "only cold content fails (502/503 naming the upstream); cached content "
    "is served",
    "tier-delete": "none expected: the node reads the bucket again and copies anew",
    "gc-evict": "none expected: an evicted image is fetched again on its next pull",
}


# -- what exists upstream ---------------------------------------------------------------------
class Catalogue:
    """What upstream holds, byte for byte, growing as the pusher adds images."""

    def __init__(self, hot: list[Image], big: Image, referred: Image, attached: set[str]):
        self.lock = threading.Lock()
        self.hot = hot
        self.big = [big]
        self.referred = referred
        self.attached = attached  # digests of the referrers of `referred`
        self.cold: list[Image] = []
        self.moving: dict[str, Image] = {}
        self.blobs: dict[str, int] = {}  # every blob upstream has: its size
        for image in [*hot, big, referred]:
            self.know(image)

    def know(self, image: Image) -> None:
        for one in [image, *image.children]:
            for digest, data in one.blobs.items():
                self.blobs[digest] = len(data)

    def pick_hot(self, rng: random.Random) -> Image:
        return rng.choice(self.hot)

    def newest_cold(self, rng: random.Random) -> Image | None:
        with self.lock:
            return rng.choice(self.cold[-3:]) if self.cold else None


def flat(image: Image) -> Image:
    return image.children[0] if image.children else image


# -- what clients saw ---------------------------------------------------------------------------
@dataclass
class Outcome:
    at: float  # when the answer (or the failure) came, time.time()
    op: str
    what: str  # "ok", "wrong", "http <status>", "cut <exception>"
    url: str


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: collections.Counter = collections.Counter()
        self.bytes = 0
        self.failures: list[Outcome] = []
        self.wrong: list[Outcome] = []

    def ok(self, op: str, n: int = 0) -> None:
        with self.lock:
            self.ops[op] += 1
            self.bytes += n

    def fail(self, op: str, what: str, url: str) -> None:
        outcome = Outcome(time.time(), op, what, url)
        with self.lock:
            self.ops[op] += 1
            (self.wrong if what == "wrong" else self.failures).append(outcome)

    def total(self) -> int:
        with self.lock:
            return sum(self.ops.values())


class Client:
    """One client: a session through the balancer, checking every byte it gets."""

    def __init__(self, base: str, catalogue: Catalogue, tally: Tally, seed: int) -> None:
        self.base = base
        self.catalogue = catalogue
        self.tally = tally
        self.rng = random.Random(seed)
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(pool_maxsize=2, max_retries=0))

    def get(self, op: str, path: str, check, method: str = "GET", **kwargs) -> bytes | None:
        """One request; `check(response)` says whether its bytes are right. The body when
        they are."""
        url = self.base + path
        try:
            response = self.session.request(method, url, timeout=120, **kwargs)
        except requests.RequestException as exc:
            self.tally.fail(op, f"cut {type(exc).__name__}", url)
            return None
        if response.status_code not in (200, 206):
            self.tally.fail(op, f"http {response.status_code}", url)
            return None
        if not check(response):
            self.tally.fail(op, "wrong", url)
            return None
        self.tally.ok(op, len(response.content))
        return response.content

    def blob(self, op: str, repository: str, digest: str) -> None:
        self.get(
            op,
            f"/v2/{repository}/blobs/{digest}",
            lambda r: hashlib.sha256(r.content).hexdigest() == digest[7:],
        )

    def manifest(self, op: str, image: Image, reference: str, method: str = "GET") -> None:
        self.get(
            op,
            f"/v2/{image.repository}/manifests/{reference}",
            lambda r: (
                method == "HEAD"
                or (
                    r.content == image.manifest
                    and r.headers.get("Docker-Content-Digest") == image.digest
                )
            ),
            method=method,
            headers={"Accept": ACCEPT},
        )

    def pull(self, op: str, image: Image) -> None:
        """A whole pull: the tag, each platform's manifest, every blob."""
        self.manifest(op, image, image.tag)
        for one in image.children or [image]:
            if image.children:
                self.manifest(op, one, one.digest)
            for digest in one.blobs:
                self.blob(op, image.repository, digest)

    def one(self) -> None:
        rng, catalogue = self.rng, self.catalogue
        op = rng.choices(
            [
                "tag",
                "digest",
                "head",
                "blob",
                "range",
                "cold",
                "big",
                "referrers",
                "moving",
                "tags",
            ],
            weights=[20, 10, 10, 20, 10, 12, 2, 5, 6, 5],
        )[0]
        image = catalogue.pick_hot(rng)
        one = flat(image)
        if op == "tag":
            self.manifest(op, image, image.tag)
        elif op in ("digest", "head"):
            self.manifest(op, one, one.digest, "GET" if op == "digest" else "HEAD")
        elif op == "blob":
            self.blob(op, image.repository, rng.choice(list(one.blobs)))
        elif op == "range":
            digest = rng.choice(list(one.blobs))
            data = one.blobs[digest]
            start = rng.randrange(len(data))
            end = min(len(data) - 1, start + rng.randrange(1, 1 << 20))
            self.get(
                op,
                f"/v2/{image.repository}/blobs/{digest}",
                lambda r: r.status_code == 206 and r.content == data[start : end + 1],
                headers={"Range": f"bytes={start}-{end}"},
            )
        elif op == "cold":
            fresh = catalogue.newest_cold(rng)
            if fresh is not None:
                self.pull(op, fresh)
        elif op == "big":
            big = rng.choice(catalogue.big)
            self.blob(op, big.repository, max(big.blobs, key=lambda d: len(big.blobs[d])))
        elif op == "referrers":
            subject = catalogue.referred
            self.get(
                op,
                f"/v2/{subject.repository}/referrers/{subject.digest}",
                lambda r: (
                    {m["digest"] for m in r.json().get("manifests", [])} == catalogue.attached
                ),
            )
        elif op == "moving":
            body = self.get(
                op,
                "/v2/soak/moving/manifests/latest",
                lambda r: (
                    (pushed := catalogue.moving.get(r.headers.get("Docker-Content-Digest", "")))
                    is not None
                    and r.content == pushed.manifest
                ),
                headers={"Accept": ACCEPT},
            )
            if body is not None:
                pushed = catalogue.moving["sha256:" + hashlib.sha256(body).hexdigest()]
                for digest in pushed.blobs:
                    self.blob(op, "soak/moving", digest)
        else:
            self.get(
                op, f"/v2/{image.repository}/tags/list", lambda r: image.tag in r.json()["tags"]
            )


def client_loop(client: Client, stop_event: threading.Event) -> None:
    while not stop_event.is_set():
        try:
            client.one()
        except Exception as exc:  # a bug of the harness's: counted, never a dead thread
            client.tally.fail("harness", f"cut {type(exc).__name__}: {exc}", "")


# -- the site -----------------------------------------------------------------------------------
class Balancer:
    """nginx with the shipped deploy/cluster/nginx.conf, its node addresses swapped for ours
    and an access log that names the node that answered."""

    def __init__(self, workdir: Path, node_ports: list[int]) -> None:
        self.workdir = workdir
        self.node_ports = node_ports
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Balancer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = (ROOT / "deploy" / "cluster" / "nginx.conf").read_text()
        servers = re.findall(r"^ *server node-\S+ (.*)$", text, re.M)
        assert servers, "deploy/cluster/nginx.conf names no nodes"
        text = re.sub(r"^ *server node-\S+ .*\n", "", text, flags=re.M)
        ours = "".join(f"    server 127.0.0.1:{p} {servers[0]}\n" for p in self.node_ports)
        text = text.replace("keepalive ", ours + "    keepalive ", 1)
        text = text.replace("listen 5050;", f"listen 127.0.0.1:{self.port};")
        temp = "".join(
            f"  {kind}_temp_path {self.workdir / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        text = text.replace(
            "http {",
            'http {\n  log_format soak \'$msec $status "$upstream_addr" "$request"\';\n'
            f"  access_log {self.workdir / 'access.log'} soak;\n{temp}",
            1,
        )
        if os.geteuid() == 0:
            text = "user root;\n" + text
        config = self.workdir / "nginx.conf"
        config.write_text(text)
        self.proc = subprocess.Popen(
            [
                require("nginx"),
                "-p",
                str(self.workdir),
                "-c",
                str(config),
                "-e",
                str(self.workdir / "error.log"),
                "-g",
                f"daemon off; pid {self.workdir / 'nginx.pid'};",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "stderr.log", "ab"),  # noqa: SIM115 - the process keeps it
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def answered_by(self) -> collections.Counter:
        counts: collections.Counter = collections.Counter()
        with contextlib.suppress(OSError), open(self.workdir / "access.log") as log:
            for line in log:
                parts = line.split('"')
                if len(parts) > 2:  # "a, b" when nginx tried a second node: b answered
                    counts[parts[1].split(", ")[-1]] += 1
        return counts

    def stop(self) -> None:
        if self.proc:
            stop(self.proc, timeout=5)


@dataclass
class Node:
    name: str
    server: Gunicorn
    tier: Path
    rss: list[tuple[float, float]] = field(default_factory=list)  # (time, MiB of its workers)


class Redises:
    """A master, a replica and three Sentinels (quorum two)."""

    def __init__(self, work: Path) -> None:
        self.servers = [RedisServer(work / "redis-1").start()]
        self.servers.append(RedisServer(work / "redis-2", replica_of=self.servers[0].port).start())
        # Down after 3 s of silence: a master slowed by this load is not taken for dead.
        self.sentinels = [
            RedisSentinel(
                work / f"sentinel-{i}", self.servers[0].port, MASTER, quorum=2, down_after_ms=3000
            ).start()
            for i in range(3)
        ]
        self.sentinel = Sentinel([("127.0.0.1", s.port) for s in self.sentinels], socket_timeout=2)

    def master(self) -> redis.Redis:
        return self.sentinel.master_for(MASTER, socket_timeout=5)

    def master_port(self) -> int:
        return self.sentinels[0].master_port_now()

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.stop()


@dataclass
class Fault:
    kind: str
    started: float
    ended: float = 0.0
    detail: str = ""

    @property
    def bound(self) -> float:
        return BOUNDS[self.kind]


class Site:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.nodes: list[Node] = []
        self.jobs: dict[str, subprocess.Popen] = {}
        try:
            self._start(work)
        except BaseException:
            self.stop()
            raise

    def _start(self, work: Path) -> None:
        self.redises = Redises(work)
        self.swift = Swift(work / "swift", workers=2).start()
        self.swift.create_bucket(BUCKET)
        self.token = TokenServer(work / "token").start()
        self.upstream = Distribution(work / "upstream", token=self.token).start()
        self.link = ThrottledRelay(self.upstream.port, LINK_MIBPS).start()
        self.pusher = Pusher(self.upstream.url, self.token.realm, self.token.service)
        self.prefix = f"soak-{os.getpid()}"
        for name in NODES:
            self.nodes.append(self._node(name))
        self.balancer = Balancer(work / "balancer", [n.server.port for n in self.nodes]).start()
        self.gc_config = self.nodes[0].server.config_path
        self.job_restarts: collections.Counter = collections.Counter()
        for job in ("worker", "scheduler"):
            self._start_job(job)

    def config(self, name: str, **gc) -> dict:
        """A node's configuration: the shipped deploy/cluster/config.yaml with this site's
        addresses, and what the soak turns on (tiers, Sentinels, sweeps, the follower)."""
        config = yaml.safe_load((ROOT / "deploy" / "cluster" / "config.yaml").read_text())
        config.pop("credentials_file", None)  # the upstream here needs none
        config["storage"]["s3"].update(
            endpoint=self.swift.endpoint,
            bucket=BUCKET,
            region=REGION,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            prefix=self.prefix,
            local_cache={"path": str(self.work / name / "tier"), "max_size": "512MiB"},
        )
        config["redis"] = {
            "url": "redis://127.0.0.1/0",
            "sentinels": [f"127.0.0.1:{s.port}" for s in self.redises.sentinels],
            "master": MASTER,
        }
        config["registries"] = [{"name": "docker.io", "url": self.link.url, "tag_ttl": TAG_TTL}]
        # Sweeps every minute: what a client last pulled 20 s ago may go.
        config["gc"] = {"interval": "60s", "delay": "20s", **gc}
        config["follow"] = {
            "images": [{"image": "soak/moving:latest"}],
            "interval": "15s",
            "tick": "5s",
        }
        # Every client is the balancer's address here: no per-client bounds.
        config["limits"] = {"max_fills_per_client": 0, "client_upstream_per_minute": 0}
        return config

    def _node(self, name: str) -> Node:
        workdir = self.work / name
        workdir.mkdir(parents=True)
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(self.config(name)))
        server = Gunicorn(path, workdir, workers=NODE_WORKERS).start()
        return Node(name, server, workdir / "tier")

    def _start_job(self, job: str) -> None:
        log = open(self.work / f"{job}.log", "ab")  # noqa: SIM115 - the process keeps it
        self.jobs[job] = subprocess.Popen(
            [sys.executable, "-m", "workers", job],
            cwd=ROOT,
            env={**os.environ, "PULLTHROUGH_CONFIG": str(self.gc_config)},
            stdout=log,
            stderr=log,
        )

    def supervise(self) -> None:
        """Restart a background job that exited (as a site's process manager does)."""
        for job, proc in list(self.jobs.items()):
            if proc.poll() is not None:
                self.job_restarts[job] += 1
                say(f"{job} exited with {proc.returncode}: started again")
                self._start_job(job)

    def node_of_pid(self, pid: int) -> Node | None:
        for node in self.nodes:
            if pid in node.server.worker_pids():
                return node
        return None

    def bucket_blobs(self) -> dict[str, int]:
        client = self.swift.client()
        found: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"{self.prefix}/{paths.BLOBS}/"
        ):
            for item in page.get("Contents", []):
                found["sha256:" + item["Key"].rsplit("/", 1)[1]] = item["Size"]
        return found

    def stop(self) -> None:
        """Everything that started (also after a start that failed half-way)."""
        for proc in self.jobs.values():
            stop(proc)
        parts = [
            getattr(self, "balancer", None),
            *(node.server for node in self.nodes),
            *(getattr(self, name, None) for name in ("link", "upstream", "token", "swift")),
            getattr(self, "redises", None),
        ]
        for part in parts:
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()


# -- the faults ---------------------------------------------------------------------------------
class Faults:
    def __init__(self, site: Site, catalogue: Catalogue, tally: Tally) -> None:
        self.site = site
        self.catalogue = catalogue
        self.tally = tally
        self.done: list[Fault] = []
        self.rng = random.Random(7)
        self.herds: list[threading.Thread] = []
        self.sweeps: list[dict] = []
        self.killed: Node | None = None
        self.background: list[threading.Thread] = []
        self.n = 0

    def run(self, kind: str) -> Fault:
        """One fault, to its end; a sweep in the background (on S3 under this load it takes
        minutes: the next faults arrive while it runs)."""
        fault = Fault(kind, time.time())
        self.done.append(fault)

        def act() -> None:
            getattr(self, kind.replace("-", "_"))(fault)
            fault.ended = time.time()
            say(f"{kind}: {fault.detail} ({fault.ended - fault.started:.1f} s)")

        if kind in BACKGROUND:
            thread = threading.Thread(target=act, name=kind)
            thread.start()
            self.background.append(thread)
        else:
            act()
        return fault

    def herd(self, image: Image, clients: int) -> None:
        """Clients that pull `image` at once, through the balancer, counted with the rest."""
        for i in range(clients):
            client = Client(self.site.balancer.url, self.catalogue, self.tally, 10_000 + i)
            thread = threading.Thread(target=client.pull, args=("herd", image))
            thread.start()
            self.herds.append(thread)

    def node_kill(self, fault: Fault) -> None:
        self.n += 1
        layer = make_layer(50_000 + self.n, BIG, "big.bin")
        image = single(f"soak/big{self.n}", "1", [layer], docker=True)
        self.site.pusher.push(image)
        self.catalogue.know(image)
        self.herd(image, 6)
        master = self.site.redises.master()
        victim = None
        deadline = time.monotonic() + 15
        while victim is None and time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                record = master.hgetall(f"pt:fill:{layer.digest}")
                owner = record.get(b"owner", b"").decode()
                if record.get(b"state") == b"streaming" and owner.count(":") >= 2:
                    victim = self.site.node_of_pid(int(owner.split(":")[1]))
            time.sleep(0.05)
        if victim is None:
            victim = self.rng.choice(self.site.nodes)
            fault.detail = f"{victim.name} SIGKILLed (its fill not seen streaming)"
        else:
            fault.detail = f"{victim.name} SIGKILLed mid-fill of {layer.digest[:19]}"
        self.killed = victim
        os.killpg(victim.server.proc.pid, signal.SIGKILL)
        victim.server.proc.wait()
        time.sleep(2)
        victim.server.start()
        with self.catalogue.lock:
            self.catalogue.big.append(image)

    def graceful_restart(self, fault: Fault) -> None:
        # The node last killed: what it resumed after its crash (fills, tier copies) is
        # under way when it is asked to stop.
        node = self.killed or self.rng.choice(self.site.nodes)
        node.server.proc.send_signal(signal.SIGTERM)
        node.server.proc.wait(timeout=90)
        node.server.start()
        fault.detail = f"{node.name} stopped with SIGTERM and started"

    def redis_failover(self, fault: Fault) -> None:
        redises = self.site.redises
        port = redises.master_port()
        old = next(s for s in redises.servers if s.port == port)
        old.proc.send_signal(signal.SIGKILL)
        old.proc.wait()
        deadline = time.monotonic() + 30
        while (now := self._master_port()) in (port, None):
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinels did not fail over in 30 s")
            time.sleep(0.1)
        promoted = time.time() - fault.started
        old.replica_of = now
        old.start()
        fault.detail = (
            f"master :{port} SIGKILLed, :{now} promoted after {promoted:.1f} s, "
            f":{port} back as its replica"
        )

    def _master_port(self) -> int | None:
        try:
            return self.site.redises.master_port()
        except (redis.RedisError, OSError):
            return None

    def s3_stop(self, fault: Fault) -> None:
        self.site.swift.stop_endpoint()
        time.sleep(S3_OUTAGE)
        self.site.swift.start_endpoint()
        fault.detail = f"S3 endpoint stopped for {S3_OUTAGE:.0f} s"

    def upstream_stop(self, fault: Fault) -> None:
        self.site.upstream.stop()
        time.sleep(UPSTREAM_OUTAGE)
        self.site.upstream.start()
        fault.detail = f"upstream stopped for {UPSTREAM_OUTAGE:.0f} s"

    def tier_delete(self, fault: Fault) -> None:
        node = self.rng.choice(self.site.nodes)
        files = sum(1 for _ in node.tier.rglob("*") if _.is_file())
        shutil.rmtree(node.tier, ignore_errors=True)
        fault.detail = f"{node.name}'s tier directory deleted ({files} files)"

    def gc_evict(self, fault: Fault) -> None:
        self.n += 1
        cold = self.catalogue.cold[-1] if self.catalogue.cold else None
        if cold is not None:
            self.herd(cold, 8)
        stored = sum(self.site.bucket_blobs().values())
        budget = int(stored * 0.6)
        config = self.site.work / f"evict-{self.n}.yaml"
        settings = self.site.config("node-a", max_size=budget)
        config.write_text(yaml.safe_dump(settings))
        report: dict = {}
        deadline = time.monotonic() + SWEEP_PATIENCE
        with open(self.site.work / "evict.log", "ab") as log:
            while time.monotonic() < deadline:  # a scheduled sweep may be running: wait
                run = subprocess.run(
                    [sys.executable, "-m", "workers", "gc"],
                    cwd=ROOT,
                    env={**os.environ, "PULLTHROUGH_CONFIG": str(config)},
                    stdout=subprocess.PIPE,
                    stderr=log,
                    timeout=SWEEP_PATIENCE,
                )
                report = json.loads(run.stdout) if run.returncode == 0 else {}
                if run.returncode == 0 and not report.get("error"):
                    break
                time.sleep(SWEEP_RETRY)  # each try is a process: not a busy loop
        self.sweeps.append(report)
        fault.detail = (
            f"sweep with max_size {budget >> 20} MiB of {stored >> 20} MiB stored: "
            f"{len(report.get('evicted', []))} tags evicted, "
            f"{report.get('deleted_blobs', '?')} blobs ({report.get('freed_bytes', 0) >> 20} MiB) "
            "deleted, while 8 clients herd onto a cold image"
        )


def schedule() -> list[tuple[float, str]]:
    kinds = list(BOUNDS)
    rounds = 1 if SHORT else 2
    plan = [k for _ in range(rounds) for k in kinds]
    first, span = SECONDS * 0.08, SECONDS * 0.8
    return [(first + span * i / len(plan), kind) for i, kind in enumerate(plan)]


# -- the run ------------------------------------------------------------------------------------
def seed_upstream(site: Site) -> Catalogue:
    standard = standard_images(24 << 20).images
    hot = [image for name, image in standard.items() if name not in ("private", "big")]
    key = Key.generate()
    referred = single("refs/app", "1", [make_layer(101, 40 * 1024)])
    signature = signature_image(referred, key, oci11=True)
    sbom = sbom_image(referred, b'{"spdxVersion": "SPDX-2.3", "name": "refs/app"}')
    for image in [*standard.values(), referred, signature, sbom]:
        site.pusher.push(image)
    site.pusher.push(tag_schema_index(referred, [signature, sbom]))
    return Catalogue(hot, standard["big"], referred, {signature.digest, sbom.digest})


def push_round(site: Site, catalogue: Catalogue, n: int) -> None:
    """A new two-platform image (cold for the cache) and soak/moving:latest moved."""
    base = make_layer(20_000 + n % 4, 512 << 10)
    children = [
        single(
            f"soak/multi{n % 6}",
            "",
            [base, make_layer(30_000 + 2 * n + i, (1 + i) << 20)],
            arch=arch,
        )
        for i, arch in enumerate(("amd64", "arm64"))
    ]
    image = index(f"soak/multi{n % 6}", f"v{n}", children)
    moving = single("soak/moving", "latest", [make_layer(40_000 + n, 300 << 10)], docker=True)
    catalogue.know(image)
    catalogue.know(moving)
    with catalogue.lock:
        catalogue.moving[moving.digest] = moving  # known before a client can see it
    site.pusher.push(image)
    site.pusher.push(moving)
    with catalogue.lock:
        catalogue.cold.append(image)


def pusher_loop(site: Site, catalogue: Catalogue, stop_event: threading.Event) -> None:
    n = 0
    while not stop_event.wait(PUSH_EVERY):
        n += 1
        with contextlib.suppress(requests.RequestException):  # the upstream is stopped:
            push_round(site, catalogue, n)  # the next round pushes again


def watch(site: Site, stop_event: threading.Event) -> None:
    """Every 2 s: restart a background job that exited, and sample the nodes' workers' RSS."""
    while not stop_event.wait(2):
        site.supervise()
        for node in site.nodes:
            rss = sum(rss_mib(pid) for pid in node.server.worker_pids())
            if rss:
                node.rss.append((time.time(), rss))


def in_flight(master: redis.Redis) -> tuple[list[str], list[dict]]:
    """The leases held, and the fill records not yet committed or failed."""
    leases = sorted(k.decode() for k in master.scan_iter("pt:lease:*"))
    fills = []
    for key in master.scan_iter("pt:fill:*"):
        record = {k.decode(): v.decode() for k, v in master.hgetall(key).items()}
        if record.get("state") in ("starting", "streaming", "committing"):
            fills.append({"key": key.decode(), **record})
    return leases, fills


def tiers_against_bucket(site: Site, in_bucket: dict[str, int]) -> dict[str, dict]:
    """Each node's tier: copies, copies the bucket lacks, copies with wrong bytes, partials."""
    report = {}
    for node in site.nodes:
        copies = orphans = wrong = 0
        for path in (node.tier / paths.BLOBS).rglob("*"):
            if not path.is_file():
                continue
            copies += 1
            digest = f"sha256:{path.name}"
            if digest not in in_bucket:
                orphans += 1
            hasher = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    hasher.update(chunk)
            wrong += hasher.hexdigest() != path.name
        partials = sum(1 for p in (node.tier / "partial").rglob("*") if p.is_file())
        report[node.name] = {"copies": copies, "not_in_bucket": orphans, "wrong": wrong,
                             "partials": partials}  # fmt: skip
    return report


# The faults that can end a fill before its commit: its blob's bytes are then fetched again
# (all of them, or those past the pieces it had stored).
CUTS_FILLS = ("node-kill", "graceful-restart", "redis-failover", "s3-stop", "upstream-stop")
# How long after the upstream sent a blob its fill may still be storing and committing it
# under this load.
FILL_SPAN = 15.0


def upstream_refetches(site: Site, catalogue: Catalogue, faults: list[Fault]) -> dict:
    """Blob bytes the upstream sent against the blobs' sizes, from its own log; the blobs
    sent more than once, and why: the GC deleted it from the bucket between (Swift's log),
    or a fault that cuts fills was under way when it was fetched before."""
    fetches: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
    for when, path, n in _blob_bodies(site.upstream):
        fetches[path.rsplit("/", 1)[1]].append((when, n))
    sent = {d: sum(n for _, n in f) for d, f in fetches.items()}
    unique = sum(catalogue.blobs.get(d, 0) for d in sent)
    again = {d for d, n in sent.items() if n > catalogue.blobs.get(d, n)}
    swift_log = (site.swift.dir / "swift.log").read_text(errors="replace")
    deleted = {
        d
        for d in again
        if f"DELETE /{BUCKET}/{site.prefix}/{paths.blob(Digest.parse(d))} " in swift_log
    }

    def cut(when: float) -> bool:
        # Fetched while the fault was on, or up to FILL_SPAN before it began: a fill stores
        # and commits its bytes for seconds after the upstream sent them (the upstream's log
        # has whole seconds: a second either side).
        return any(
            f.kind in CUTS_FILLS
            and f.started - FILL_SPAN - 1 <= when <= (f.ended or time.time()) + f.bound + 1
            for f in faults
        )

    by_fault = {d for d in again - deleted if any(cut(t) for t, _ in fetches[d][:-1])}
    return {
        "sent": sum(sent.values()),
        "unique": unique,
        "blobs": len(sent),
        "again": len(again),
        "again_bytes": sum(sent[d] - catalogue.blobs.get(d, 0) for d in again),
        "again_after_delete": len(deleted),
        "again_after_cut": len(by_fault),
        "again_unexplained": sorted(again - deleted - by_fault),
    }


def _blob_bodies(upstream: Distribution) -> list[tuple[float, str, int]]:
    """(when, path, body bytes) of each blob GET the upstream answered with bytes."""
    text = upstream.log_path.read_text(errors="replace")
    pattern = re.compile(
        r"\[(\d+/\w+/\d+:\d+:\d+:\d+ [+-]\d+)\] "
        r'"GET (\S+/blobs/sha256:\w+) HTTP/[0-9.]+" (?:200|206) (\d+)'
    )
    return [
        (datetime.datetime.strptime(when, "%d/%b/%Y:%H:%M:%S %z").timestamp(), path, int(n))
        for when, path, n in pattern.findall(text)
    ]


def attribute(faults: list[Fault], failures: list[Outcome]) -> tuple[dict, list[Outcome]]:
    """Each failure to the last fault whose window holds it; those no window holds."""
    per: dict[int, list[Outcome]] = collections.defaultdict(list)
    unexplained = []
    for failure in failures:
        holders = [
            i for i, f in enumerate(faults)
            if f.started <= failure.at <= (f.ended or time.time()) + f.bound
        ]  # fmt: skip
        if holders:
            per[holders[-1]].append(failure)
        else:
            unexplained.append(failure)
    return per, unexplained


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="pt-soak-cluster-"))
    say(f"soak-cluster: {len(NODES)} nodes, {CLIENTS} clients, {SECONDS:.0f} s, in {work}")
    site = Site(work)
    try:
        result = soak(site)
    finally:
        site.stop()
    problems = judge(result)
    result["problems"] = problems
    if out := os.environ.get("SOAK_RESULT"):
        Path(out).write_text(json.dumps(result, indent=1, default=str))
    if not SHORT:
        write_section(ROOT / "docs" / "reliability.md", "<!-- soak-cluster -->", report(result))
    print("\n".join(report(result)))
    if problems:
        print(f"soak-cluster failed ({work} kept): " + "; ".join(problems), file=sys.stderr)
    elif not os.environ.get("SOAK_KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if problems else 0)


def soak(site: Site) -> dict:
    """The load and the faults on the site, then what they left: the figures."""
    catalogue = seed_upstream(site)
    push_round(site, catalogue, 0)
    tally, stop_event = Tally(), threading.Event()
    clients = [Client(site.balancer.url, catalogue, tally, i) for i in range(CLIENTS)]
    threads = [threading.Thread(target=client_loop, args=(c, stop_event)) for c in clients]
    threads.append(threading.Thread(target=pusher_loop, args=(site, catalogue, stop_event)))
    threads.append(threading.Thread(target=watch, args=(site, stop_event)))
    faults = Faults(site, catalogue, tally)
    started_at, started = time.time(), time.monotonic()
    for thread in threads:
        thread.start()
    pending = schedule()
    try:
        while (elapsed := time.monotonic() - started) < SECONDS:
            if pending and elapsed >= pending[0][0]:
                faults.run(pending.pop(0)[1])
                continue
            time.sleep(0.2)
            if int(elapsed) % 30 == 0 and elapsed - int(elapsed) < 0.2:
                say(f"{elapsed:.0f} s: {tally.total()} requests, {len(tally.failures)} failed, "
                    f"{len(tally.wrong)} wrong")  # fmt: skip
    finally:
        stop_event.set()
        for thread in [*threads, *faults.herds]:
            thread.join(timeout=180)
    for thread in faults.background:  # a sweep still running ends before the checks
        thread.join(timeout=SWEEP_PATIENCE)
    wall = time.monotonic() - started
    say(f"load stopped after {wall:.0f} s; waiting for fills to end")
    master = site.redises.master()
    deadline = time.monotonic() + 60
    while in_flight(master) != ([], []) and time.monotonic() < deadline:
        time.sleep(1)
    leases, fills = in_flight(master)
    for proc in site.jobs.values():  # no sweep under the checks below
        stop(proc)
    site.jobs.clear()
    verify = run_module("registry", site.gc_config, "verify", check=False, timeout=900)
    in_bucket = site.bucket_blobs()
    tiers = tiers_against_bucket(site, in_bucket)
    refetches = upstream_refetches(site, catalogue, faults.done)
    answered = site.balancer.answered_by()
    per, unexplained = attribute(faults.done, tally.failures)
    return {
        "seconds": round(wall),
        "clients": CLIENTS,
        "requests": tally.total(),
        "bytes_checked": tally.bytes,
        "ops": dict(tally.ops),
        "wrong": [asdict(o) for o in tally.wrong],
        "failed": len(tally.failures),
        "unexplained": [asdict(o) for o in unexplained],
        "faults": [
            {
                **asdict(f),
                "at": round(f.started - started_at, 1),
                "took": round(f.ended - f.started, 1),
                "bound": f.bound,
                "failures": collections.Counter(o.what for o in per.get(i, [])),
                "failed_ops": collections.Counter(o.op for o in per.get(i, [])),
                "recovered_after": round(max([0.0, *(o.at - f.ended for o in per.get(i, []))]), 1),
            }
            for i, f in enumerate(faults.done)
        ],
        "leases_left": leases,
        "fills_left": fills,
        "verify": {
            "rc": verify.returncode,
            "out": (verify.stdout.strip() or verify.stderr.strip())[-300:],
        },
        "blobs_in_bucket": len(in_bucket),
        "tiers": tiers,
        "upstream": refetches,
        "link_bytes": site.link.bytes_down,
        "answered_by": {
            next((n.name for n in site.nodes if addr.endswith(f":{n.server.port}")), addr): count
            for addr, count in answered.items()
        },
        "rss": {
            n.name: [round(n.rss[0][1]), round(max(r for _, r in n.rss)), round(n.rss[-1][1])]
            for n in site.nodes
            if n.rss
        },
        "job_restarts": dict(site.job_restarts),
        "sweeps": faults.sweeps,
    }


def judge(result: dict) -> list[str]:
    problems = []
    if result["wrong"]:
        problems.append(f"{len(result['wrong'])} answers with wrong bytes")
    if result["unexplained"]:
        problems.append(f"{len(result['unexplained'])} failures outside every fault's window")
    for fault in result["faults"]:
        if not fault["ended"]:
            problems.append(f"{fault['kind']} at {fault['at']} s did not end")
        elif fault["recovered_after"] > fault["bound"]:
            problems.append(f"{fault['kind']} at {fault['at']} s took longer than its bound")
    if result["leases_left"] or result["fills_left"]:
        problems.append(
            f"leases left: {result['leases_left']}; fill records left: {result['fills_left']}"
        )
    if result["verify"]["rc"] != 0:
        problems.append(f"verify: {result['verify']['out']}")
    for name, tier in result["tiers"].items():
        if tier["not_in_bucket"] or tier["wrong"]:
            problems.append(f"{name}'s tier: {tier}")
    if result["upstream"]["again_unexplained"]:
        problems.append(
            f"{len(result['upstream']['again_unexplained'])} blobs fetched from upstream more "
            "than once, never deleted between"
        )
    return problems


def report(result: dict) -> list[str]:
    up = result["upstream"]
    lines = [
        "## Cluster soak: `make soak-cluster`",
        "",
        f"Produced by `make soak-cluster` (bench/soak_cluster.py): {len(NODES)} nodes of "
        f"{NODE_WORKERS} gevent workers on one Swift bucket with a local tier each, behind "
        "nginx (deploy/cluster/nginx.conf), Redis master + replica + 3 Sentinels, the GC "
        f"worker and scheduler, the upstream behind a {LINK_MIBPS:.0f} MiB/s link; "
        f"{result['clients']} clients for {result['seconds']} s on this 2-core machine.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests | {result['requests']} ({result['requests'] / result['seconds']:.0f}/s), "
        f"{result['bytes_checked'] / (1 << 30):.1f} GiB checked |",
        f"| by operation | {', '.join(f'{k} {v}' for k, v in sorted(result['ops'].items()))} |",
        f"| wrong bytes | {len(result['wrong'])} |",
        f"| failed requests (all inside a fault's window: below) | {result['failed']} |",
        f"| failures outside every window | {len(result['unexplained'])} |",
        f"| upstream blob bytes / unique blob bytes | {up['sent'] >> 20} MiB / "
        f"{up['unique'] >> 20} MiB ({up['sent'] / max(up['unique'], 1):.3f}) |",
        f"| blobs fetched more than once: all / the GC had deleted them / a fault had cut "
        f"their fill | {up['again']} / {up['again_after_delete']} / {up['again_after_cut']} "
        f"({up['again_bytes'] >> 20} MiB again) |",
        f"| leases / in-flight fill records at the end | {len(result['leases_left'])} / "
        f"{len(result['fills_left'])} |",
        f"| `python -m registry verify` | rc {result['verify']['rc']}: "
        f"{result['verify']['out'].splitlines()[-1] if result['verify']['out'] else ''} |",
        f"| blobs in the bucket at the end | {result['blobs_in_bucket']} |",
        *[
            f"| {name}'s tier: copies / not in the bucket / wrong bytes / partials | "
            f"{t['copies']} / {t['not_in_bucket']} / {t['wrong']} / {t['partials']} |"
            for name, t in result["tiers"].items()
        ],
        *[
            f"| {name} workers' RSS start / peak / end (MiB, both together) | "
            f"{r[0]} / {r[1]} / {r[2]} |"
            for name, r in result["rss"].items()
        ],
        f"| requests answered per node (nginx's log) | "
        f"{', '.join(f'{k} {v}' for k, v in sorted(result['answered_by'].items()))} |",
        f"| GC worker / scheduler restarts | {result['job_restarts'] or 0} |",
        "",
        "### Faults",
        "",
        "| at (s) | fault | took (s) | failed requests | of which | recovered (s after) "
        "| bound (s) |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {f['at']} | {f['kind']}: {f['detail']} | {f['took']} | "
            f"{', '.join(f'{n} {w}' for w, n in f['failures'].items()) or 0} | "
            f"{', '.join(f'{n} {op}' for op, n in sorted(f['failed_ops'].items())) or '-'} | "
            f"{f['recovered_after']} | {f['bound']:.0f} |"
            for f in result["faults"]
        ],
        "",
        "Why each fault's failures are expected:",
        "",
        *[f"- {kind}: {why}" for kind, why in WHY.items()],
        "",
    ]
    if result["problems"]:
        lines += ["Problems:", "", *[f"- {p}" for p in result["problems"]], ""]
    return lines


if __name__ == "__main__":
    main()
