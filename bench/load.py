"""Load generators for the benchmarks: wrk for GET rates, ApacheBench for HEAD rates."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from registry.mediatypes import MANIFEST_TYPES
from tests.support.servers import require

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
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
