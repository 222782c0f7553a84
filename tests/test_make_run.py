"""`make run`, as the README describes it: a private Redis, every Procfile process (web, GC
worker, GC scheduler) in the foreground, and Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import redis as redis_lib
import requests
import yaml

from tests.support.servers import ROOT, free_port, wait_for_port

# `make run` as a terminal starts it, with SIGINT at its default: a test run started in the
# background by a shell without job control (`cmd &` in a script) inherits SIGINT ignored, and
# bash cannot trap a signal ignored when it started, so scripts/run would never pass Ctrl-C on.
SIGINT_AT_DEFAULT = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execvp(sys.argv[1], sys.argv[1:])",
]


def start_make_run(tmp_path, config: dict, port: int, redis_port: int, workers: int):
    """`make run` with `config` as its config file and no REDIS_URL, as a terminal starts
    it; returns the process and its open log (written to tmp_path/make-run.log)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        PULLTHROUGH_CONFIG=str(path),
        PULLTHROUGH_BIND=f"127.0.0.1:{port}",
        PULLTHROUGH_WORKERS=str(workers),
        PULLTHROUGH_DATA_DIR=str(tmp_path / "data"),
        PULLTHROUGH_REDIS_PORT=str(redis_port),
    )
    log = open(tmp_path / "make-run.log", "wb")  # noqa: SIM115 - the caller closes it
    proc = subprocess.Popen(
        [*SIGINT_AT_DEFAULT, "make", "run"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=log,
        stderr=log,
    )
    return proc, log


def test_make_run_serves_and_ctrl_c_stops_everything(tmp_path):
    port, redis_port = free_port(), free_port()
    config = {"storage": {"root": str(tmp_path / "store")}}
    proc, log = start_make_run(tmp_path, config, port, redis_port, workers=2)
    try:
        wait_for_port(port, timeout=60, proc=proc)
        # A client that keeps its connection open, as Docker daemons do.
        session = requests.Session()
        response = session.get(f"http://127.0.0.1:{port}/v2/", timeout=5)
        assert response.status_code == 200
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        wait_for_port(redis_port, timeout=5)
        # The private Redis has a generated password: without it, nothing can be read.
        anonymous = redis_lib.Redis(port=redis_port)
        try:
            anonymous.get("pt:gc:last")
            raise AssertionError("the private Redis answered without a password")
        except redis_lib.AuthenticationError:
            pass
        password = (tmp_path / "data" / "redis" / "password").read_text()
        assert len(password) >= 32
        assert (tmp_path / "data" / "redis" / "password").stat().st_mode & 0o077 == 0
        # The GC roles run too: the scheduler enqueues the first sweep, the rq worker runs it.
        store = redis_lib.Redis(port=redis_port, password=password)
        deadline = time.monotonic() + 30
        while not store.exists("pt:gc:last") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.hget("pt:gc:last", "error") == b"", "no GC run was recorded"
        assert store.scard("rq:workers") == 1
        store.close()
        time.sleep(1)  # a person presses Ctrl-C after the workers have booted
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        proc.wait(timeout=25)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        print((tmp_path / "make-run.log").read_text(errors="replace")[-3000:])
    secret = (tmp_path / "data" / "redis" / "password").read_text()
    assert secret not in (tmp_path / "make-run.log").read_text(errors="replace")
    time.sleep(0.5)
    for p in (port, redis_port):
        try:
            requests.get(f"http://127.0.0.1:{p}/", timeout=1)
            raise AssertionError(f"something still listens on {p} after Ctrl-C")
        except requests.exceptions.ConnectionError:
            pass


def test_make_run_uses_the_redis_its_config_names(tmp_path, redis_server):
    """With `redis.url` in the config file and REDIS_URL unset, `make run` starts no Redis
    of its own: the cache's keys land in the one the config names."""
    port, redis_port = free_port(), free_port()
    config = {"storage": {"root": str(tmp_path / "store")}, "redis": {"url": redis_server.url}}
    store = redis_lib.Redis.from_url(redis_server.url)
    row = "pt:host:other@127.0.0.1"  # this client's row of the Hosts table
    proc, log = start_make_run(tmp_path, config, port, redis_port, workers=1)
    try:
        wait_for_port(port, timeout=60, proc=proc)
        agent = {"User-Agent": "make-run-test/1"}
        assert requests.get(f"http://127.0.0.1:{port}/v2/", headers=agent, timeout=5).ok
        deadline = time.monotonic() + 10  # the Hosts table is written each second
        while store.hget(row, "agent") != b"make-run-test/1" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.hget(row, "agent") == b"make-run-test/1", "the configured Redis was unused"
        assert not (tmp_path / "data" / "redis").exists()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=25)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "make-run.log").read_text(errors="replace")
    assert "private Redis" not in text, text[-2000:]
    store.close()
