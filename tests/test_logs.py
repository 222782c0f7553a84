"""What the processes write to their log stream, read as an operator's log shipper reads it:
with PULLTHROUGH_LOG_FORMAT=json every line of the web process (gunicorn's own, the access
lines, upstream calls, fills, warnings, a TLS handshake on the plain port) and of the GC
worker is one JSON object; and the web process started the short way, `gunicorn -k gevent
wsgi:app` with no `-c`, still writes its access log and opens no control socket in $HOME."""

from __future__ import annotations

import json
import time

import pytest
import requests

from registry.mediatypes import MANIFEST_TYPES
from tests.support.clients import tls_hello
from tests.support.servers import Gunicorn, RedisServer, run_module

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}


def wait_for(cache: Gunicorn, text: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while text not in cache.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cache.log()


def test_in_json_mode_every_line_of_every_process_is_one_json_object(tmp_path, upstream, images):
    # A Redis of its own: the TLS advice is said once per client per hour.
    redis = RedisServer(tmp_path / "redis").start()
    cache = Gunicorn.with_config(
        tmp_path / "web",
        redis.url,
        [
            {"name": "docker.io", "url": upstream.url},
            {"name": "down.test", "url": "http://127.0.0.1:1"},
        ],
        workers=2,
        env={"PULLTHROUGH_LOG_FORMAT": "json"},
    )
    try:
        image = images["busybox"]
        base = f"{cache.url}/v2/{image.repository}"
        requests.get(f"{base}/manifests/{image.tag}", headers=ACCEPT, timeout=30)
        for digest in image.blobs:
            requests.get(f"{base}/blobs/{digest}", timeout=30)
        requests.get(f"{cache.url}/v2/down.test/x/y/manifests/1", headers=ACCEPT, timeout=30)
        requests.get(f"{base}/manifests/nosuchtag", headers=ACCEPT, timeout=30)
        tls_hello(cache.port)
        wait_for(cache, "TLS handshake")
        cache.stop()  # gunicorn's own shutdown lines too
        worker = run_module(
            "workers",
            cache.config_path,
            *("worker", "--burst"),
            env={"PULLTHROUGH_LOG_FORMAT": "json"},
        )
    finally:
        cache.stop()
        redis.stop()

    records = []
    for text in (cache.log(), worker.stderr):
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                pytest.fail(f"not a JSON line: {line!r}")
            assert isinstance(record, dict) and {"time", "pid", "level", "logger"} <= set(record)
            records.append(record)
    loggers = {r["logger"] for r in records}
    # gunicorn's own, the access log, upstream calls and the TLS advice all came out
    assert {"gunicorn.error", "registry.access", "registry.upstream.client"} <= loggers, loggers
    assert any(r["logger"].startswith("rq") for r in records), loggers
    messages = " ".join(r.get("message", "") for r in records)
    assert "Starting gunicorn" in messages and "TLS handshake from 127.0.0.1" in messages


def test_started_without_a_config_file_the_access_log_is_there_and_home_is_untouched(
    tmp_path, upstream
):
    home = tmp_path / "home"
    home.mkdir()
    redis = RedisServer(tmp_path / "redis").start()
    cache = Gunicorn.with_config(
        tmp_path / "short",
        redis.url,
        [{"name": "docker.io", "url": upstream.url}],
        workers=1,
        env={"HOME": str(home), "XDG_RUNTIME_DIR": ""},
        command=("-k", "gevent"),
    )
    try:
        assert requests.get(f"{cache.url}/v2/", timeout=10).status_code == 200
        log = wait_for(cache, "registry.access request")
        assert "registry.access request client=127.0.0.1 method=GET" in log, log
        tls_hello(cache.port)
        assert "TLS handshake from 127.0.0.1" in wait_for(cache, "TLS handshake")
    finally:
        cache.stop()
        redis.stop()
    assert list(home.iterdir()) == []  # no ~/.gunicorn control socket
