"""Freshness and offline-first serving under real gunicorn (3 gevent workers): tag TTLs shared
by all workers, immutable-tag rules, stale-if-error for every kind of upstream failure, the
per-upstream circuit breaker, negative caching, rate-limit records and bearer tokens shared
through Redis. Upstreams: a distribution of its own that the tests stop and restart, and a
fake for 429s with rate-limit headers, 5xx and hangs. Upstream request counts are asserted."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest
import redis as redis_lib
import requests

from registry.coordination.tag_moves import KEY as TAG_MOVES
from registry.mediatypes import MANIFEST_TYPES
from tests.support.clients import skopeo_copy, skopeo_policy
from tests.support.fakes import FakeRegistry, Route
from tests.support.images import Pusher, make_layer, single
from tests.support.servers import Distribution, Gunicorn

pytestmark = pytest.mark.usefixtures("forget_upstream_health")

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}
TAG_TTL = 2.0
NEGATIVE_TTL = 3.0
BACKOFF = 3.0
READ_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def own(tmp_path_factory, token_server, images):
    """A distribution of this module's own, so stopping it disturbs no other test."""
    registry = Distribution(tmp_path_factory.mktemp("own-upstream"), token=token_server).start()
    pusher = Pusher(registry.url, token_server.realm, token_server.service)
    for name in ("alpine", "busybox", "ocisingle"):
        pusher.push(images[name])
    registry.pusher = pusher
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, redis_server, own, fake):
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("freshness"),
        redis_server.url,
        [
            {
                "name": "docker.io",
                "url": own.url,
                "tag_ttl": TAG_TTL,
                "tag_ttl_overrides": [{"match": "library/alpine:*", "immutable": True}],
            },
            # Every request for a fake.test tag revalidates: each one is an upstream call.
            {"name": "fake.test", "url": fake.url, "tag_ttl": 0},
        ],
        upstream={
            "connect_timeout": 1,
            "read_timeout": READ_TIMEOUT,
            "negative_ttl": NEGATIVE_TTL,
            "breaker_failures": 3,
            "breaker_window": 30,
            "breaker_backoff": BACKOFF,
        },
    )
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server):
    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def manifest_calls(upstream: Distribution, mark: int, repository: str) -> list[tuple[str, int]]:
    """(method, status) of the manifest requests upstream answered since `mark`, challenges
    (401 answers to token-less requests) left out."""
    return [
        (m, s)
        for m, p, s in upstream.requests_since(mark)
        if f"/v2/{repository}/manifests/" in p and s != 401
    ]


def get_many(url: str, n: int, method: str = "GET") -> list[requests.Response]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(
            pool.map(lambda _: requests.request(method, url, headers=ACCEPT, timeout=30), range(n))
        )


def fake_image(
    fake: FakeRegistry, repository: str, seed: int, headers: dict | None = None, **knobs
) -> tuple[str, bytes]:
    """Serve a valid image manifest as `repository:1` on the fake; (cache path, bytes)."""
    image = single(repository, "1", [make_layer(seed, 1000)])
    fake.routes[f"/v2/{repository}/manifests/1"] = Route(
        body=image.manifest,
        headers={
            "Content-Type": image.media_type,
            "Docker-Content-Digest": image.digest,
            **(headers or {}),
        },
        **knobs,
    )
    return f"/v2/fake.test/{repository}/manifests/1", image.manifest


# -- tag TTL --------------------------------------------------------------------------------------
def test_tag_is_revalidated_once_per_ttl_by_one_head_across_workers(cache, own, images):
    image = images["busybox"]
    url = f"{cache.url}/v2/{image.repository}/manifests/{image.tag}"
    mark = own.mark()
    assert requests.get(url, headers=ACCEPT, timeout=30).content == image.manifest
    within = get_many(url, 30)
    assert {r.content for r in within} == {image.manifest}
    assert {r.headers["X-Cache"] for r in within} == {"HIT"}
    assert manifest_calls(own, mark, image.repository) == [("GET", 200)]

    time.sleep(TAG_TTL + 0.3)
    mark = own.mark()
    after = get_many(url, 30)
    assert {r.status_code for r in after} == {200}
    assert {r.content for r in after} == {image.manifest}
    # One HEAD for 30 concurrent requests on 3 workers; the digest did not change: no GET.
    assert manifest_calls(own, mark, image.repository) == [("HEAD", 200)]
    assert sorted(r.headers["X-Cache"] for r in after).count("REVALIDATED") == 1


def test_moved_tag_is_fetched_once_after_its_ttl_and_tells_every_process(cache, own, redis):
    """The move rewrites pt:tag-moves (what S3 nodes' processes remember is read again:
    tests/test_cluster.py); a tag cached for the first time moves nothing and does not."""
    repository = "library/moving"
    first = single(repository, "latest", [make_layer(201, 2000)], docker=True)
    second = single(repository, "latest", [make_layer(202, 2000)], docker=True)
    own.pusher.push(first)
    url = f"{cache.url}/v2/{repository}/manifests/latest"
    token = redis.get(TAG_MOVES)
    assert requests.get(url, headers=ACCEPT, timeout=30).content == first.manifest
    assert redis.get(TAG_MOVES) == token
    own.pusher.push(second)
    # Within the TTL the cache still serves what it validated.
    assert requests.get(url, headers=ACCEPT, timeout=30).content == first.manifest
    time.sleep(TAG_TTL + 0.3)
    mark = own.mark()
    moved = get_many(url, 10)
    assert {r.content for r in moved} == {second.manifest}
    assert {r.headers["Docker-Content-Digest"] for r in moved} == {second.digest}
    assert manifest_calls(own, mark, repository) == [("HEAD", 200), ("GET", 200)]
    assert redis.get(TAG_MOVES) not in (None, token)


def test_immutable_tag_rule_is_never_revalidated(cache, own, images):
    image = images["alpine"]
    url = f"{cache.url}/v2/{image.repository}/manifests/{image.tag}"
    assert requests.get(url, headers=ACCEPT, timeout=30).status_code == 200
    time.sleep(TAG_TTL + 0.3)
    mark = own.mark()
    again = requests.get(url, headers=ACCEPT, timeout=30)
    assert again.content == image.manifest and again.headers["X-Cache"] == "HIT"
    assert manifest_calls(own, mark, image.repository) == []


# -- upstream down: a real distribution, stopped and restarted ------------------------------------
def test_cached_image_pulls_completely_while_upstream_is_stopped(cache, own, images, tmp_path):
    policy = skopeo_policy(tmp_path)
    image = images["ocisingle"]
    ref = f"127.0.0.1:{cache.port}/{image.repository}:{image.tag}"
    skopeo_copy(policy, ref, tmp_path / "warm")
    time.sleep(TAG_TTL + 0.3)  # the tag is due for revalidation: upstream will be asked
    own.stop()
    try:
        for attempt in range(3):  # enough failures to open the breaker on the way
            started = time.monotonic()
            skopeo_copy(policy, ref, tmp_path / f"offline{attempt}", timeout=60)
            elapsed = time.monotonic() - started
            assert elapsed < 5, f"cached pull {attempt} took {elapsed:.1f} s with upstream down"
        manifest = (tmp_path / "offline2" / "manifest.json").read_bytes()
        assert manifest == image.manifest

        started = time.monotonic()
        failed = skopeo_copy(
            policy,
            f"127.0.0.1:{cache.port}/library/neverpulled:1",
            tmp_path / "uncached",
            check=False,
            timeout=60,
        )
        assert failed.returncode != 0
        assert time.monotonic() - started < 5
        assert "503" in failed.stderr, failed.stderr  # skopeo shows no body for a 5xx
        direct = requests.get(
            f"{cache.url}/v2/library/neverpulled/manifests/1", headers=ACCEPT, timeout=30
        )
        assert direct.status_code == 503
        assert own.url in direct.json()["errors"][0]["message"]
    finally:
        own.start()
    # Back up: once the breaker's back-off has passed, uncached content flows again.
    time.sleep(BACKOFF + 0.5)
    busybox = requests.get(f"{cache.url}/v2/library/busybox/manifests/1.36", headers=ACCEPT)
    assert busybox.status_code == 200


# -- the fake upstream: 5xx, hangs, 429 -----------------------------------------------------------
def test_5xx_serves_stale_then_the_breaker_stops_calling_upstream(cache, fake):
    path, body = fake_image(fake, "org/flaky", 301)
    url = cache.url + path
    assert requests.get(url, headers=ACCEPT, timeout=30).headers["X-Cache"] == "MISS"
    fake.routes["/v2/org/flaky/manifests/1"] = Route(status=503, body=b"down")
    before = fake.count("HEAD", "/org/flaky/manifests/1")
    for _ in range(8):
        stale = requests.get(url, headers=ACCEPT, timeout=30)
        assert stale.status_code == 200 and stale.content == body
        assert stale.headers["X-Cache"] == "STALE"
        assert stale.headers["Warning"].startswith("110 ")
    # Three failures open the breaker; the other five never reached upstream.
    assert fake.count("HEAD", "/org/flaky/manifests/1") - before == 3
    uncached = requests.get(f"{cache.url}/v2/fake.test/org/other/manifests/1", timeout=30)
    assert uncached.status_code == 503
    assert "keeps failing" in uncached.json()["errors"][0]["message"]
    assert fake.count("GET", "/org/other/") == 0

    # After the back-off one probe goes through; upstream is healthy again, so it is fresh.
    fake_image(fake, "org/flaky", 301)
    time.sleep(BACKOFF + 0.3)
    fresh = requests.get(url, headers=ACCEPT, timeout=30)
    assert fresh.headers["X-Cache"] == "REVALIDATED"
    assert fake.count("HEAD", "/org/flaky/manifests/1") - before == 4


def test_connection_reset_serves_the_cached_tag_stale(cache, fake):
    path, body = fake_image(fake, "org/resets", 304)
    url = cache.url + path
    assert requests.get(url, headers=ACCEPT, timeout=30).headers["X-Cache"] == "MISS"
    fake.routes["/v2/org/resets/manifests/1"] = Route(abort=True)
    stale = requests.get(url, headers=ACCEPT, timeout=30)
    assert stale.status_code == 200 and stale.content == body
    assert stale.headers["X-Cache"] == "STALE"
    fake.routes["/v2/org/resets2/manifests/1"] = Route(abort=True)
    uncached = requests.get(f"{cache.url}/v2/fake.test/org/resets2/manifests/1", timeout=30)
    assert uncached.status_code == 503
    assert "reset the connection" in uncached.json()["errors"][0]["message"]


def test_hanging_upstream_opens_the_breaker_so_cached_tags_answer_at_once(cache, fake):
    path, body = fake_image(fake, "org/hangs", 302)
    url = cache.url + path
    assert requests.get(url, headers=ACCEPT, timeout=30).status_code == 200
    fake_image(fake, "org/hangs", 302, delay=READ_TIMEOUT * 5)
    timings = []
    for _ in range(5):
        started = time.monotonic()
        stale = requests.get(url, headers=ACCEPT, timeout=30)
        timings.append(time.monotonic() - started)
        assert stale.status_code == 200 and stale.content == body
        assert stale.headers["X-Cache"] == "STALE"
    # The first three wait out the read timeout; then the breaker answers without waiting.
    assert all(t >= READ_TIMEOUT * 0.9 for t in timings[:3]), timings
    assert all(t < 0.5 for t in timings[3:]), timings


def test_429_serves_stale_records_the_quota_and_stops_asking(cache, fake, redis):
    limits = {"ratelimit-limit": "100;w=21600", "docker-ratelimit-source": "203.0.113.7"}
    path, body = fake_image(
        fake, "org/quota", 303, headers={**limits, "ratelimit-remaining": "42;w=21600"}
    )
    url = cache.url + path
    assert requests.get(url, headers=ACCEPT, timeout=30).status_code == 200
    record = redis.hgetall("pt:upstream:fake.test:ratelimit")
    assert record["limit"] == "100" and record["remaining"] == "42"
    assert record["window"] == "21600" and record["source"] == "203.0.113.7"

    fake.routes["/v2/org/quota/manifests/1"] = Route(
        status=429,
        body=b'{"errors":[{"code":"TOOMANYREQUESTS"}]}',
        headers={**limits, "ratelimit-remaining": "0;w=21600", "Retry-After": "60"},
    )
    before = len(fake.hits)
    mark = len(cache.log())
    stale = requests.get(url, headers=ACCEPT, timeout=30)
    assert stale.status_code == 200 and stale.content == body
    assert stale.headers["X-Cache"] == "STALE"
    assert redis.hget("pt:upstream:fake.test:ratelimit", "remaining") == "0"
    # The log says why it served stale, not that the tag is "not cached".
    (said,) = [line for line in cache.log()[mark:].splitlines() if "serving stale" in line]
    assert "fake.test/org/quota:1: upstream fake.test is rate-limiting this cache" in said
    assert "not cached" not in said

    uncached = requests.get(f"{cache.url}/v2/fake.test/org/fresh/manifests/1", timeout=30)
    assert uncached.status_code == 429
    assert uncached.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert 55 <= int(uncached.headers["Retry-After"]) <= 60
    for _ in range(5):
        assert requests.get(url, headers=ACCEPT, timeout=30).headers["X-Cache"] == "STALE"
    # Only the first 429 reached upstream: the rest waited out its Retry-After here.
    assert len(fake.hits) - before == 1


def test_broken_token_service_serves_cached_tags_stale(cache, own, token_server):
    # A repository of its own, so no token for its scope is cached yet.
    image = single("library/tokens", "1", [make_layer(204, 2000)], docker=True)
    own.pusher.push(image)
    url = f"{cache.url}/v2/{image.repository}/manifests/{image.tag}"
    token_server.expires_in = 2  # our copy lives 1 s: the next revalidation needs a new one
    try:
        assert requests.get(url, headers=ACCEPT, timeout=30).headers["X-Cache"] == "MISS"
        time.sleep(TAG_TTL + 0.3)
        for status in (503, 401):
            token_server.fail_with = status
            stale = requests.get(url, headers=ACCEPT, timeout=30)
            assert stale.status_code == 200 and stale.content == image.manifest, status
            assert stale.headers["X-Cache"] == "STALE"
    finally:
        token_server.fail_with = None
        token_server.expires_in = 300


# -- negative caching -----------------------------------------------------------------------------
def test_missing_tag_is_remembered_so_a_retry_storm_stays_here(cache, own):
    url = f"{cache.url}/v2/library/busybox/manifests/no-such-tag"
    mark = own.mark()
    storm = get_many(url, 20)
    assert {r.status_code for r in storm} == {404}
    assert {r.json()["errors"][0]["code"] for r in storm} == {"MANIFEST_UNKNOWN"}
    assert manifest_calls(own, mark, "library/busybox") == [("GET", 404)]
    time.sleep(NEGATIVE_TTL + 0.3)
    assert requests.get(url, headers=ACCEPT, timeout=30).status_code == 404
    assert manifest_calls(own, mark, "library/busybox") == [("GET", 404), ("GET", 404)]


# -- tokens shared through Redis ------------------------------------------------------------------
def test_one_bearer_token_serves_every_worker_even_new_ones(cache, own, token_server, redis):
    scope = "repository:team/token-scope:pull"  # a scope no other test asks for
    before = sum(1 for r in token_server.requests if scope in r["scopes"])
    url = f"{cache.url}/v2/team/token-scope/manifests/"
    # Distinct unknown digests: each is an upstream call, none is remembered for another.
    assert requests.get(url + "sha256:" + "0" * 64, headers=ACCEPT).status_code == 404
    assert sum(1 for r in token_server.requests if scope in r["scopes"]) - before == 1
    # Replace every worker: the new processes hold no token of their own.
    old = set(cache.worker_pids())
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = set(cache.worker_pids())
        if len(current) == 3 and not current & old:
            break
        time.sleep(0.2)
    assert len(current) == 3 and not current & old
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(
            pool.map(
                lambda i: requests.get(url + f"sha256:{i:064x}", headers=ACCEPT, timeout=30),
                range(1, 25),
            )
        )
    assert {a.status_code for a in answers} == {404}
    assert sum(1 for r in token_server.requests if scope in r["scopes"]) - before == 1
    assert list(redis.scan_iter("pt:token:*"))
