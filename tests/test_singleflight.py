"""Single-flight against a real upstream: distribution behind a bandwidth-capped link (as
Docker Hub over a home connection), several gunicorn workers, many clients at once. Counts what
upstream was asked in its own access log and what it sent through the link."""

from __future__ import annotations

import concurrent.futures
import hashlib
import time

import pytest
import requests

from registry.mediatypes import MANIFEST_TYPES
from tests.support.servers import Gunicorn

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, redis_server, link):
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("singleflight"),
        redis_server.url,
        [{"name": "docker.io", "url": link.url}],
        workers=4,
    )
    yield server
    server.stop()


def ok_requests(upstream, mark: int, method: str, part: str) -> int:
    return sum(
        1 for m, p, s in upstream.requests_since(mark) if m == method and part in p and s < 400
    )


def test_concurrent_cold_tag_requests_reach_upstream_once(cache, upstream, images, redis_client):
    image = images["busybox"]
    url = f"{cache.url}/v2/{image.repository}/manifests/{image.tag}"
    mark = upstream.mark()
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        responses = list(
            pool.map(lambda _: requests.get(url, headers=ACCEPT, timeout=30), range(24))
        )
    assert {r.status_code for r in responses} == {200}
    assert {r.content for r in responses} == {image.manifest}
    assert ok_requests(upstream, mark, "GET", f"/v2/{image.repository}/manifests/") == 1
    assert ok_requests(upstream, mark, "HEAD", f"/v2/{image.repository}/manifests/") == 0


def test_cold_blob_herd_is_one_upstream_get_streamed_to_every_worker(
    cache, upstream, images, link, redis_client
):
    image = images["big"]
    layer = max(image.blobs, key=lambda d: len(image.blobs[d]))
    size = len(image.blobs[layer])
    url = f"{cache.url}/v2/{image.repository}/blobs/{layer}"
    requests.get(
        f"{cache.url}/v2/{image.repository}/manifests/{image.tag}", headers=ACCEPT, timeout=30
    ).raise_for_status()

    def one(_):
        started = time.monotonic()
        with requests.get(url, stream=True, timeout=60) as response:
            chunks = response.iter_content(1 << 16)
            first = next(chunks)
            ttfb = time.monotonic() - started
            hasher = hashlib.sha256(first)
            for chunk in chunks:
                hasher.update(chunk)
        return response.status_code, "sha256:" + hasher.hexdigest(), ttfb, response.headers

    mark, sent_before = upstream.mark(), link.bytes_down
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    wall = time.monotonic() - started
    assert {r[0] for r in results} == {200}
    assert {r[1] for r in results} == {layer}
    assert {r[3]["Content-Length"] for r in results} == {str(size)}
    # One fill: its ranges (the blob is past upstream.range_min_size) are each a 206, and
    # the link carried the blob once (plus headers), not once per client or per worker.
    gets = [s for m, p, s in upstream.requests_since(mark) if m == "GET" and layer in p]
    assert gets and set(gets) == {206}, gets
    assert link.bytes_down - sent_before < size * 1.02
    # The fill takes about size / the link's speed (2 s); followers get bytes as they land.
    ttfbs = sorted(r[2] for r in results)
    assert wall > 1.5, wall
    assert ttfbs[len(ttfbs) // 2] < min(1.0, wall / 3), (ttfbs, wall)
