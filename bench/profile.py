"""Where a cached manifest request's CPU goes, for `make bench`: one pullthrough worker
(gunicorn, 1 gevent worker, the bench's own store and Redis) under load (wrk for GET,
ApacheBench for HEAD) while py-spy samples its stacks. The worker's CPU time over the run,
divided by the requests it served, is the CPU per request; the samples share it among the
components, each sample going to the innermost frame that belongs to one."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.load import SECONDS, ab_head, wrk
from bench.proc import cpu_seconds
from tests.support.servers import Gunicorn

# (component, file fragments), innermost frame first: the first component a sample's
# innermost frames belong to takes it.
COMPONENTS = (
    ("metrics", ("prometheus_client/", "prometheus_flask_exporter/", "registry/metrics.py")),
    ("access log", ("registry/accesslog.py", "registry/logs.py")),
    ("Hosts table", ("registry/clients.py", "registry/coordination/hosts.py")),
    (
        "pull counts",
        (
            "registry/coordination/pulls.py",
            "registry/coordination/hourly.py",
            "registry/coordination/batches.py",
        ),
    ),
    (
        "lookup (tag record, manifest)",
        ("registry/pullthrough/", "registry/store/", "registry/names.py", "registry/digests.py"),
    ),
    (
        "request parsing (gunicorn)",
        ("gunicorn/http/message.py", "gunicorn/http/parser.py", "gunicorn/http/unreader.py"),
    ),
    (
        "response building and sending",
        ("gunicorn/http/wsgi.py", "gevent/_socketcommon.py", "gevent/_socket3.py"),
    ),
    ("routing and framework (Flask, werkzeug)", ("flask/", "werkzeug/")),
    ("our handler (api/)", ("registry/api/",)),
)
OTHER = "worker loop (gunicorn, gevent) and the rest"
CASES = (
    ("GET by tag", "GET", "tag"),
    ("HEAD by tag", "HEAD", "tag"),
    ("GET by digest", "GET", "digest"),
)
# requirements-bench.txt installs it beside this interpreter.
PY_SPY = str(Path(sys.executable).parent / "py-spy")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def component(stack: list[str]) -> str:
    for frame in reversed(stack):
        found = FRAME.match(frame)
        path = found.group("file") if found else frame
        for name, fragments in COMPONENTS:
            if any(fragment in path for fragment in fragments):
                return name
    return OTHER


def shares(raw: Path) -> dict[str, float]:
    """Each component's share of the samples in py-spy's raw output."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[component(stack.split(";"))] += int(count)
    total = sum(counts.values()) or 1
    return {name: counts[name] / total for name in counts}


def manifest_profile(config: Path, work: Path, digest: str) -> dict[str, dict[str, float]]:
    """{case: {component: microseconds of CPU per request}} for each of CASES."""
    server = Gunicorn(config, work / "profiled", workers=1).start()
    try:
        (worker,) = server.worker_pids()
        out = {}
        for case, method, kind in CASES:
            ref = "1" if kind == "tag" else digest
            url = f"{server.url}/v2/library/bench/manifests/{ref}"
            raw = work / f"profile-{method}-{kind}.txt"
            sampler = subprocess.Popen(
                [
                    *(PY_SPY, "record", "-p", str(worker), "-r", "200"),
                    *("-f", "raw", "-d", f"{SECONDS:g}", "-o", str(raw)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            before = cpu_seconds([worker])
            rate = (wrk(url, work) if method == "GET" else ab_head(url))["rps"]
            cpu = cpu_seconds([worker]) - before
            sampler.wait(timeout=SECONDS + 30)
            per_request = cpu / (rate * SECONDS) * 1e6
            out[case] = {name: share * per_request for name, share in shares(raw).items()}
            out[case]["total"] = per_request
        return out
    finally:
        server.stop()
