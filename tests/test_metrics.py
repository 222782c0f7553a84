"""/metrics under real gunicorn with several workers: every scrape shows the sum over all
workers, request metrics are grouped by route, cache/upstream/fill counters match the traffic
driven, Redis-held state (quota, breaker, storage, GC) is exported, and `promtool check
metrics` accepts the exposition."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import random
import re
import subprocess
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from registry.mediatypes import MANIFEST_TYPES
from tests.support.fakes import Route
from tests.support.servers import ROOT, Gunicorn, require, run_module

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}

pytestmark = pytest.mark.usefixtures("forget_upstream_health")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, redis_server, upstream, fake):
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("metrics"),
        redis_server.url,
        [{"name": "docker.io", "url": upstream.url}, {"name": "fake.test", "url": fake.url}],
        workers=3,
    )
    yield server
    server.stop()


def scrape(cache) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{cache.url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def many(urls: list[str]) -> list[requests.Response]:
    # A new connection per request, many at once: the requests land on every worker.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda u: requests.get(u, headers=ACCEPT, timeout=30), urls))


def test_counters_are_summed_over_every_worker(cache, images, upstream, token_server):
    image = images["busybox"]
    manifest_url = f"{cache.url}/v2/{image.repository}/manifests/{image.tag}"
    before = scrape(cache)
    upstream_mark, tokens_before = upstream.mark(), len(token_server.requests)
    assert requests.get(manifest_url, headers=ACCEPT, timeout=30).status_code == 200
    assert {r.status_code for r in many([manifest_url] * 40)} == {200}
    layer = max(image.blobs, key=lambda d: len(image.blobs[d]))
    blob_url = f"{cache.url}/v2/{image.repository}/blobs/{layer}"
    assert requests.get(blob_url, timeout=30).content == image.blobs[layer]
    hits = many([blob_url] * 30)
    assert {hashlib.sha256(r.content).hexdigest() for r in hits} == {layer[7:]}

    # A blob is counted when its last byte has gone, a moment after the client has it.
    size = len(image.blobs[layer])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        settled = scrape(cache)
        sent = value(settled, "pullthrough_blob_transfer_seconds_count", source="cache")
        if sent - value(before, "pullthrough_blob_transfer_seconds_count", source="cache") >= 30:
            break
        time.sleep(0.1)
    # Any worker answers with the same sums.
    scrapes = [scrape(cache) for _ in range(6)]
    after = scrapes[0]

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    for other in scrapes[1:]:
        assert value(
            other,
            "pullthrough_cache_requests_total",
            kind="manifest",
            registry="docker.io",
            result="hit",
        ) == value(
            after,
            "pullthrough_cache_requests_total",
            kind="manifest",
            registry="docker.io",
            result="hit",
        )
    hub = {"registry": "docker.io"}
    assert delta("pullthrough_cache_requests_total", kind="manifest", result="miss", **hub) == 1
    assert delta("pullthrough_cache_requests_total", kind="manifest", result="hit", **hub) == 40
    assert delta("pullthrough_cache_requests_total", kind="blob", result="miss", **hub) == 1
    assert delta("pullthrough_cache_requests_total", kind="blob", result="hit", **hub) == 30
    assert delta("pullthrough_served_bytes_total", kind="blob", source="cache", **hub) == 30 * size
    assert delta("pullthrough_served_bytes_total", kind="blob", source="upstream", **hub) == size
    assert delta("pullthrough_blob_transfer_seconds_count", source="cache") == 30
    assert delta("pullthrough_upstream_bytes_total", **hub) == size
    assert delta("pullthrough_fills_total", role="fetcher", **hub) == 1
    # The upstream's own log and the token service are the truth of what was asked of them.
    logged = upstream.requests_since(upstream_mark)
    gets = [r for r in logged if r[0] == "GET"]
    tokens = len(token_server.requests) - tokens_before
    # The blob's answer is a 206: it is asked for as the first range of a parallel fill.
    ok = sum(1 for r in gets if r[2] in (200, 206))
    answered = sum(
        delta("pullthrough_upstream_requests_total", method="GET", status=status, **hub)
        for status in ("200", "206")
    )
    assert answered == ok + tokens
    assert delta("pullthrough_upstream_requests_total", method="GET", status="401", **hub) == sum(
        1 for r in gets if r[2] == 401
    )
    assert ok == 2  # the manifest and the blob, once each

    # Request metrics are per route, not per path: no digest appears in any label.
    routes = {
        dict(labels).get("url_rule")
        for (name, labels) in after
        if name == "pullthrough_http_request_duration_seconds_count"
    }
    assert "/v2/<path:name>/blobs/<digest>" in routes
    assert not any("sha256" in str(labels) for (_name, labels) in after)


def test_failures_quota_and_breaker_are_exported(cache, fake):
    poisoned = random.randbytes(100_000)
    digest = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    fake.routes[f"/v2/org/poison/blobs/{digest}"] = Route(body=poisoned)
    before = scrape(cache)
    # The client sees a stream cut short or an error, depending on when the fill fails.
    with contextlib.suppress(requests.exceptions.ChunkedEncodingError):
        requests.get(f"{cache.url}/v2/fake.test/org/poison/blobs/{digest}", timeout=30)
    fake.routes["/v2/org/limited/manifests/1"] = Route(
        status=429,
        body=b"{}",
        headers={"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "0;w=21600"},
    )
    assert requests.get(f"{cache.url}/v2/fake.test/org/limited/manifests/1").status_code == 429
    after = scrape(cache)
    fake_reg = {"registry": "fake.test"}
    failures = value(after, "pullthrough_fill_failures_total", reason="digest_mismatch", **fake_reg)
    assert (
        failures
        - value(before, "pullthrough_fill_failures_total", reason="digest_mismatch", **fake_reg)
        == 1
    )
    assert (
        value(after, "pullthrough_upstream_requests_total", method="GET", status="429", **fake_reg)
        >= 1
    )
    assert (
        value(after, "pullthrough_upstream_ratelimit_limit", window_seconds="21600", **fake_reg)
        == 100
    )
    assert (
        value(after, "pullthrough_upstream_ratelimit_remaining", window_seconds="21600", **fake_reg)
        == 0
    )
    assert value(after, "pullthrough_upstream_breaker_open", **fake_reg) == 1
    assert value(after, "pullthrough_redis_up") == 1


def test_promtool_accepts_the_exposition(cache, images):
    requests.get(f"{cache.url}/v2/library/alpine/manifests/3.19", headers=ACCEPT, timeout=30)
    text = requests.get(f"{cache.url}/metrics", timeout=10).text
    result = subprocess.run(
        [require("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_scrape_job_and_dashboard_use_what_is_exported(cache, fake):
    check = subprocess.run(
        [require("promtool"), "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # The events behind the Redis-held families: a sweep, and an upstream announcing a quota.
    run_module("registry", cache.config_path, "gc")
    fake.routes["/v2/org/dash/manifests/1"] = Route(
        status=404,
        body=b"{}",
        headers={"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "5;w=21600"},
    )
    requests.get(f"{cache.url}/v2/fake.test/org/dash/manifests/1", headers=ACCEPT, timeout=30)
    exported = {name for name, _labels in scrape(cache)}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "pullthrough.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"pullthrough_[a-z_]+", target["expr"])
    }
    assert used and used <= exported, used - exported
