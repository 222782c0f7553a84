"""A fresh cached manifest is answered in front of Flask (registry/api/fast.py) exactly as the
Flask route answers it: the same status, headers and bytes, by tag and by digest, GET and
HEAD; and counted in the same places (the access log, /metrics, the Hosts table). A query
string sends a request down the Flask route, which is how the two are compared."""

from __future__ import annotations

import re
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from registry.mediatypes import MANIFEST_TYPES
from tests.support.servers import Gunicorn, RedisServer

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES), "User-Agent": "docker/20.10.24 go/go1.19"}
VARYING = {"Date", "Server", "Connection", "Keep-Alive"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, upstream):
    redis = RedisServer(tmp_path_factory.mktemp("fast-redis")).start()
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("fast"),
        redis.url,
        [{"name": "docker.io", "url": upstream.url}],
        workers=2,
    )
    yield server
    server.stop()
    redis.stop()


def answer(method: str, url: str) -> tuple[int, dict[str, str], bytes]:
    response = requests.request(method, url, headers=ACCEPT, timeout=30)
    headers = {k: v for k, v in response.headers.items() if k not in VARYING}
    return response.status_code, headers, response.content


def manifest_hits(cache) -> float:
    text = requests.get(f"{cache.url}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "pullthrough_cache_requests_total"
        and s.labels == {"kind": "manifest", "registry": "docker.io", "result": "hit"}
    )


def pulls(cache) -> int:
    page = requests.get(f"{cache.url}/ui/hosts", timeout=10).text
    found = re.search(r'data-client="docker@127.0.0.1"[^>]*data-pulls="(\d+)"', page)
    assert found, page[-2000:]
    return int(found.group(1))


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_the_fast_answer_is_the_flask_routes_answer(cache, images, method):
    image = images["busybox"]
    base = f"{cache.url}/v2/{image.repository}/manifests"
    assert requests.get(f"{base}/{image.tag}", headers=ACCEPT, timeout=30).ok  # cached now
    for reference in (image.tag, image.digest):
        fast = answer(method, f"{base}/{reference}")
        routed = answer(method, f"{base}/{reference}?flask=1")  # a query string: Flask's
        assert fast == routed, (reference, fast[1], routed[1])
        assert fast[0] == 200 and fast[1]["X-Cache"] == "HIT"
        assert fast[1]["Docker-Content-Digest"] == image.digest
        assert fast[2] == (image.manifest if method == "GET" else b"")


def test_a_fast_answer_is_counted_where_the_routes_are(cache, images):
    image = images["alpine"]
    url = f"{cache.url}/v2/{image.repository}/manifests/{image.tag}"
    assert requests.get(url, headers=ACCEPT, timeout=30).ok  # the miss, through Flask
    time.sleep(1.5)  # every worker has written what it counted so far
    before, pulls_before = manifest_hits(cache), pulls(cache)
    mark = len(cache.log())
    for _ in range(3):
        assert requests.get(url, headers=ACCEPT, timeout=30).headers["X-Cache"] == "HIT"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [
            line
            for line in cache.log()[mark:].splitlines()
            if f"reference={image.tag}" in line and "registry.access request" in line
        ]
        if len(lines) >= 3:
            break
        time.sleep(0.05)
    assert len(lines) == 3 and all("status=200" in line and "cache=hit" in line for line in lines)
    assert f"bytes={len(image.manifest)}" in lines[0]
    assert f"digest={image.digest}" in lines[0]
    assert manifest_hits(cache) - before == 3
    # The Hosts table: each worker writes its counts within a second.
    deadline = time.monotonic() + 5
    while pulls(cache) != pulls_before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pulls(cache) == pulls_before + 3


def test_a_fresh_cached_manifest_never_reaches_flask_and_the_rest_does(app, client, images):
    image = images["busybox"]
    url = f"/v2/{image.repository}/manifests/{image.tag}"
    assert client.get(url, headers=ACCEPT).headers["X-Cache"] == "MISS"  # through Flask
    reached: list[str] = []
    flask = app.wsgi_app.flask

    def counting(environ, start_response):
        reached.append(environ["PATH_INFO"])
        return flask(environ, start_response)

    app.wsgi_app.flask = counting
    assert client.get(url, headers=ACCEPT).data == image.manifest
    head = client.head(f"/v2/{image.repository}/manifests/{image.digest}", headers=ACCEPT)
    assert head.status_code == 200
    assert reached == []
    client.get(f"{url}?ns=docker.io", headers=ACCEPT)  # a query string
    client.get(f"/v2/{image.repository}/manifests/nosuchtag", headers=ACCEPT)  # a miss
    client.get(url, headers={"Accept": "application/x-other"})  # an Accept it does not meet
    assert len(reached) == 3
