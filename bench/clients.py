"""The benchmarks' herd clients: streamed GETs that hash every byte, run in processes of their own.

A herd of 50 Python threads in the benchmark's own process shares one interpreter lock with
the bandwidth relay that models the upstream link (tests/support/servers.py): under the herd
the relay got the lock late and the link delivered about half its rate, so the herd was
measured through a slower link than the single download it is compared with. The clients
now run in a few processes of their own (as Docker daemons are), each reading into one buffer
with http.client and hashing it, and start together once every process is ready.

`python -m bench.clients` is the child: URLs as JSON on stdin, "ready" on stdout, then after
a line on stdin the results as JSON.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

CLIENTS_PER_PROCESS = 10
BUFFER = 1 << 20


def download(url: str) -> tuple[int, str, float]:
    """(status, sha256 hex, time to first byte) of one streamed GET; OSError or
    http.client.HTTPException when the connection breaks or the body ends short."""
    started = time.monotonic()
    parts = urllib.parse.urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        view = memoryview(bytearray(BUFFER))
        hasher = hashlib.sha256()
        n = response.readinto(view)
        ttfb = time.monotonic() - started
        while n:
            hasher.update(view[:n])
            n = response.readinto(view)
        return response.status, hasher.hexdigest(), ttfb
    finally:
        connection.close()


def herd(urls: list[str]) -> dict:
    """GET every URL at once, from ceil(len / CLIENTS_PER_PROCESS) processes. Returns the
    results in URL order (status, hex, ttfb), the wall time from the common start to the last
    byte, and the CPU seconds the client processes spent from that start."""
    count = max(1, -(-len(urls) // CLIENTS_PER_PROCESS))
    root = str(Path(__file__).resolve().parent.parent)
    children = []
    for k in range(count):
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.clients"],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        child.stdin.write(json.dumps(urls[k::count]) + "\n")
        child.stdin.flush()
        children.append(child)
    for child in children:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("a herd client process did not start")
    started = time.monotonic()
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    results: list = [None] * len(urls)
    cpu = 0.0
    for k, child in enumerate(children):
        out, _ = child.communicate(timeout=900)
        if child.returncode != 0:
            raise RuntimeError(f"a herd client process exited {child.returncode}")
        report = json.loads(out)
        results[k::count] = [tuple(r) for r in report["results"]]
        cpu += report["cpu"]
    return {"results": results, "wall": time.monotonic() - started, "cpu": cpu}


def _child() -> None:
    urls = json.loads(sys.stdin.readline())
    print("ready", flush=True)
    sys.stdin.readline()
    times = os.times()
    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        results = list(pool.map(download, urls))
    after = os.times()
    cpu = (after.user - times.user) + (after.system - times.system)
    print(json.dumps({"results": results, "cpu": cpu}))


if __name__ == "__main__":
    _child()
