"""Load generators for the benchmarks: wrk for GET rates, ApacheBench for HEAD rates, curl for
blob throughput."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from registry.mediatypes import MANIFEST_TYPES
from tests.support.servers import require

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
BLOB_MIB = int(os.environ.get("BENCH_BLOB_MIB", "256"))
HERD = int(os.environ.get("BENCH_HERD", "50"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "4"))
# 25 MiB/s is about a 200 Mbit/s home link.
WAN_MIBPS = float(os.environ.get("BENCH_WAN_MIBPS", "25"))
# Manifest rates, and the cold huge blob to 8 clients (a fresh blob each round), are the median
# of this many rounds, the servers taking turns.
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
HUGE_MIB = int(os.environ.get("BENCH_HUGE_MIB", "1024"))
# Parallel ranges: a RANGE_MIB blob through a CDN-like link (each connection capped at
# CDN_CONNECTION_MIBPS, all of them at CDN_TOTAL_MIBPS), and through a link with only a total
# cap of TOTAL_ONLY_MIBPS.
RANGE_MIB = int(os.environ.get("BENCH_RANGE_MIB", "256"))
CDN_CONNECTION_MIBPS = float(os.environ.get("BENCH_CDN_CONNECTION_MIBPS", "8"))
CDN_TOTAL_MIBPS = float(os.environ.get("BENCH_CDN_TOTAL_MIBPS", "64"))
TOTAL_ONLY_MIBPS = float(os.environ.get("BENCH_TOTAL_ONLY_MIBPS", "32"))
# Runs of each throughput figure per server, the servers taking turns (the median is shown).
REPEATS = int(os.environ.get("BENCH_REPEATS", "7"))
# One client's warm 1 GiB takes half a second and its rate moves by a tenth from run to run,
# for nginx as for pullthrough: more runs make its median steadier.
ONE_CLIENT_REPEATS = 3 * REPEATS
# What Docker and containerd send; without it distribution rewrites manifests to schema 1.
ACCEPT = ", ".join(MANIFEST_TYPES[:4])

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, work: Path) -> dict:
    """GET requests/s and median latency (ms) from wrk, 2 threads, 32 connections."""
    script = work / "wrk.lua"
    script.write_text(f'wrk.headers["Accept"] = "{ACCEPT}"\n')
    out = subprocess.run(
        [require("wrk"), "-t2", "-c32", f"-d{SECONDS:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    assert p50 and p99, out
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": float(p50.group(1)) * _UNITS[p50.group(2)],
        "p99_ms": float(p99.group(1)) * _UNITS[p99.group(2)],
        "errors": sum(int(n) for n in errors.groups()) if errors else 0,
    }


def ab_head(url: str) -> dict:
    """HEAD requests/s and median latency (ms) from ApacheBench, 32 keep-alive connections
    (wrk 4.1 waits for a body after a HEAD that carries Content-Length)."""
    args = ["-q", "-k", "-i", "-c32", f"-t{SECONDS:g}", "-n1000000", "-H", f"Accept: {ACCEPT}"]
    out = subprocess.run(
        [require("ab"), *args, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    if "Non-2xx" in out or not failed or failed.group(1) != "0":
        raise RuntimeError(f"ab saw errors against {url}:\n{out}")
    return {
        "rps": float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1)),
        "p50_ms": float(re.search(r"\n\s+50%\s+(\d+)", out).group(1)),
    }


def curl_downloads(
    url: str, clients: int, size: int, *, follow: bool = False, headers: tuple[str, ...] = ()
) -> float:
    """Aggregate MiB/s of `clients` concurrent curl downloads of `url` (each checked to get
    `size` bytes); curl writes to /dev/null, so the client side costs little CPU. `follow`:
    follow redirects (the status checked is the last one's)."""
    command = [require("curl"), "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"]
    if follow:
        command.append("-L")
    for header in headers:
        command += ["-H", header]
    started = time.monotonic()
    procs = [
        subprocess.Popen([*command, url], stdout=subprocess.PIPE, text=True) for _ in range(clients)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    wall = time.monotonic() - started
    for out in outputs:
        status, got = out.split()
        if status != "200" or int(got) != size:
            raise RuntimeError(f"curl got {out!r} from {url}, expected {size} bytes")
    return clients * size / wall / (1 << 20)
