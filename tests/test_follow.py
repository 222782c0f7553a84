"""Followed tags kept warm: against the real distribution (new digests, version ranges, the
previous digest kept from the GC, the next client pull served without upstream), a fake with
Docker Hub's quota headers and faults (the quota reserve, an outage mid-prefetch, a client
joining a prefetch), the scheduler, the command line and the UI page in the browser."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import random
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import replace

import pytest
import requests
import yaml
from playwright.sync_api import sync_playwright

from registry import create_app
from registry.config import FollowRule, FollowSettings, GcSettings
from registry.follow import FollowState
from registry.gc import Collector
from registry.pullthrough.follower import Follower
from tests.conftest import make_settings
from tests.support.clients import require
from tests.support.fakes import Route
from tests.support.images import DOCKER_MANIFEST, OCI_MANIFEST, Pusher, make_layer, single
from tests.support.servers import ROOT, Gunicorn, module_env, run_module

ACCEPT = {"Accept": DOCKER_MANIFEST}
ACCEPT_OCI = {"Accept": OCI_MANIFEST}


@pytest.fixture
def pusher(upstream, token_server):
    return Pusher(upstream.url, token_server.realm, token_server.service)


def follower_for(tmp_path, redis_server, upstream_url, follow: FollowSettings, **kwargs):
    settings = replace(
        make_settings(tmp_path / "data", redis_server.url, upstream_url, read_timeout=3),
        follow=follow,
    )
    app = create_app(settings)
    pt = app.extensions["pullthrough"]
    return app.test_client(), Follower(pt, pt.coord.follows, follow, **kwargs), pt


def blobs_asked(upstream, mark) -> list:
    return [r for r in upstream.requests_since(mark) if "/blobs/" in r[1] and r[2] < 400]


def test_a_new_digest_under_a_followed_tag_is_fetched_within_one_interval_with_no_client(
    tmp_path, redis_server, redis_client, upstream, pusher
):
    seed = random.randrange(1 << 30)
    old = single("follow/app", "1", [make_layer(seed, 64 * 1024)], docker=True)
    pusher.push(old)
    clock = [time.time()]
    interval = 600.0
    follow = FollowSettings(images=(FollowRule("follow/app:1"),), interval=interval)
    client, follower, pt = follower_for(
        tmp_path, redis_server, upstream.url, follow, clock=lambda: clock[0]
    )
    assert client.get("/v2/follow/app/manifests/1", headers=ACCEPT).data == old.manifest
    report = follower.tick()
    assert report.followed == 1 and report.checked == 0  # its check lies ahead

    new = single("follow/app", "1", [make_layer(seed + 1, 96 * 1024)], docker=True)
    pusher.push(new)
    clock[0] += interval  # one interval on: whatever point in it the tag was given
    mark = upstream.mark()
    report = follower.tick()
    assert report.checked == 1 and report.states == {"current": 1}
    assert report.fetched_bytes == sum(len(b) for b in new.blobs.values())
    for digest, data in new.blobs.items():
        hexpart = digest.split(":")[1]
        path = tmp_path / "data" / "blobs" / "sha256" / hexpart[:2] / hexpart
        assert path.read_bytes() == data
    asked = [(m, p.rsplit("/", 2)[-2], s) for m, p, s in upstream.requests_since(mark)]
    assert ("HEAD", "manifests", 200) in asked and ("GET", "manifests", 200) in asked

    # The next client pull asks upstream nothing at all: the tag was confirmed just now.
    mark = upstream.mark()
    assert client.get("/v2/follow/app/manifests/1", headers=ACCEPT).data == new.manifest
    for digest, data in new.blobs.items():
        assert client.get(f"/v2/follow/app/blobs/{digest}").data == data
    assert upstream.requests_since(mark) == []

    # The digest it pointed to before is kept from the GC (keep_previous: 1).
    record = pt.coord.follows.read(["docker.io/follow/app:1"])[0]
    assert record.state == FollowState.CURRENT and record.previous == [old.digest]
    policy = GcSettings(delay=0)
    Collector(pt.store, pt.coord, policy, clock=lambda: time.time() + 10).run()
    assert pt.store.read_blob(_digest(old.digest)) == old.manifest
    # A third version: the follower keeps the second, lets the first go, and so does the GC.
    newest = single("follow/app", "1", [make_layer(seed + 2, 32 * 1024)], docker=True)
    pusher.push(newest)
    clock[0] += interval
    assert follower.tick().states == {"current": 1}
    record = pt.coord.follows.read(["docker.io/follow/app:1"])[0]
    assert record.digest == newest.digest and record.previous == [new.digest]
    Collector(pt.store, pt.coord, policy, clock=lambda: time.time() + 10).run()
    assert pt.store.blob_size(_digest(old.digest)) is None
    assert pt.store.read_blob(_digest(new.digest)) == new.manifest


def test_a_version_range_follows_the_tags_in_it_and_picks_up_new_ones(
    tmp_path, redis_server, redis_client, upstream, pusher
):
    seed = random.randrange(1 << 30)
    for n, tag in enumerate(["7.0.1", "7.2.4", "8.0.0", "latest", "7.2-alpine"]):
        pusher.push(single("follow/redis", tag, [make_layer(seed + n, 8 * 1024)], docker=True))
    follow = FollowSettings(images=(FollowRule("follow/redis:>=7 <8"),), interval=1)
    _client, follower, pt = follower_for(tmp_path, redis_server, upstream.url, follow)
    report = follower.tick(force=True)
    assert sorted(pt.coord.follows.followed()) == [
        "docker.io/follow/redis:7.0.1",
        "docker.io/follow/redis:7.2.4",
    ]
    assert report.states == {"current": 2}
    pushed = single("follow/redis", "7.4.0", [make_layer(seed + 9, 8 * 1024)], docker=True)
    pusher.push(pushed)
    time.sleep(1.1)  # the tag list is asked again once per interval
    follower.tick(force=True)
    assert "docker.io/follow/redis:7.4.0" in pt.coord.follows.followed()
    record = pt.store.read_tag_of("docker.io/follow/redis", "7.4.0")
    assert record is not None and str(record.digest) == pushed.digest


def _manifest_routes(fake, repository: str, tag: str, image, quota: dict[str, str]) -> None:
    headers = {"Content-Type": image.media_type, "Docker-Content-Digest": image.digest, **quota}
    fake.routes[f"/v2/{repository}/manifests/{tag}"] = Route(body=image.manifest, headers=headers)
    fake.routes[f"/v2/{repository}/manifests/{image.digest}"] = Route(
        body=image.manifest, headers=headers
    )


def _quota(remaining: int) -> dict[str, str]:
    return {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": f"{remaining};w=21600"}


def test_the_quota_reserve_stops_manifest_gets_until_there_is_quota(
    tmp_path, redis_server, redis_client, fake
):
    image = single("quota/app", "1", [make_layer(random.randrange(1 << 30), 8 * 1024)])
    _manifest_routes(fake, "quota/app", "1", image, _quota(15))
    for digest, data in image.blobs.items():
        fake.routes[f"/v2/quota/app/blobs/{digest}"] = Route(body=data)
    follow = FollowSettings(images=(FollowRule("quota/app:1"),), interval=60)
    _client, follower, pt = follower_for(tmp_path, redis_server, fake.url, follow)
    gets = fake.count("GET", "/quota/app/manifests/")
    heads = fake.count("HEAD", "/quota/app/manifests/")
    report = follower.tick(force=True)
    assert report.states == {"quota": 1}
    # The HEAD (free on Docker Hub) told it 15 of 100 are left: no GET below 20 %.
    assert fake.count("HEAD", "/quota/app/manifests/") == heads + 1
    assert fake.count("GET", "/quota/app/manifests/") == gets
    record = pt.coord.follows.read(["docker.io/quota/app:1"])[0]
    assert "15 of 100" in record.message
    _manifest_routes(fake, "quota/app", "1", image, _quota(80))
    report = follower.tick(force=True)
    assert report.states == {"current": 1}
    assert pt.store.read_tag_of("docker.io/quota/app", "1") is not None
    # Every request it made is counted apart from clients', in /metrics.
    metrics = _client.get("/metrics").get_data(as_text=True)
    assert _sample(metrics, "pullthrough_follow_upstream_requests_total", kind="head") == 2
    assert _sample(metrics, "pullthrough_follow_upstream_requests_total", kind="manifest") == 1
    assert _sample(metrics, "pullthrough_follow_upstream_requests_total", kind="blob") == len(
        image.blobs
    )
    assert _sample(metrics, "pullthrough_follow_checks_total", state="quota") == 1


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in /metrics")


def _serve_one_layer_image(fake, repository: str, layer: bytes) -> None:
    """`repository:1` on the fake: a manifest whose one layer is `layer`, and its config;
    the layer's own route is the test's to set."""
    image = single(repository, "1", [])
    manifest = json.loads(image.manifest)
    manifest["layers"] = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
         "digest": "sha256:" + hashlib.sha256(layer).hexdigest(), "size": len(layer)}
    ]  # fmt: skip
    image.manifest = json.dumps(manifest).encode()
    _manifest_routes(fake, repository, "1", image, {})
    for digest, body in image.blobs.items():
        fake.routes[f"/v2/{repository}/blobs/{digest}"] = Route(body=body)


def test_an_outage_during_a_prefetch_leaves_no_partial_and_is_retried_next_interval(
    tmp_path, redis_server, redis_client, fake
):
    data = random.randbytes(1_500_000)
    layer = "sha256:" + hashlib.sha256(data).hexdigest()
    _serve_one_layer_image(fake, "outage/app", data)
    # Upstream breaks off the layer 600 kB in (the fill has stored its whole 256 KiB reads)
    # and is down from then on: the fill keeps what it got for a resume, its takeover gets
    # a 503.
    path = f"/v2/outage/app/blobs/{layer}"
    fake.routes[path] = Route(body=data, send_bytes=600_000, reset=True, trickle=0.05)

    def outage() -> None:
        while fake.count("GET", layer) < 1:
            time.sleep(0.005)
        fake.routes[path] = Route(status=503, body=b"down")

    threading.Thread(target=outage, daemon=True).start()
    follow = FollowSettings(images=(FollowRule("outage/app:1"),), interval=60)
    _client, follower, pt = follower_for(tmp_path, redis_server, fake.url, follow)
    report = follower.tick(force=True)
    assert report.states == {"failed": 1}
    record = pt.coord.follows.read(["docker.io/outage/app:1"])[0]
    assert "docker.io" in record.message, record.message
    assert record.next_check > time.time() + 30  # next interval, not at once
    uploads = tmp_path / "data" / "uploads"
    assert fake.count("GET", layer) >= 2  # fetched, then asked again for the rest
    assert not uploads.exists() or not [p for p in uploads.rglob("*") if p.is_file()]
    assert pt.store.blob_size(_digest(layer)) is None
    # Upstream back: the next interval's check fetches it.
    fake.routes[path] = Route(body=data)
    report = follower.tick(force=True)
    assert report.states == {"current": 1}
    assert pt.store.read_blob(_digest(layer)) == data


def test_a_client_pulling_during_a_prefetch_joins_it(tmp_path, redis_server, redis_client, fake):
    data = random.randbytes(1_500_000)
    layer = "sha256:" + hashlib.sha256(data).hexdigest()
    _serve_one_layer_image(fake, "join/app", data)
    fake.routes[f"/v2/join/app/blobs/{layer}"] = Route(body=data, trickle=0.05)
    follow = FollowSettings(images=(FollowRule("join/app:1"),), interval=60)
    client, follower, pt = follower_for(tmp_path, redis_server, fake.url, follow)
    before = fake.count("GET", layer)
    prefetch = threading.Thread(target=follower.tick, kwargs={"force": True})
    prefetch.start()
    deadline = time.monotonic() + 10
    while pt.coord.fills.read(_digest(layer)).state is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    response = client.get(f"/v2/join/app/blobs/{layer}", buffered=False)
    first = next(iter(response.response))
    waited = time.monotonic() - started
    body = first + b"".join(response.response)
    prefetch.join(timeout=60)
    assert body == data
    assert waited < 1.0  # bytes at once, not after the whole prefetch (about 1.2 s here)
    assert fake.count("GET", layer) - before == 1


def test_a_check_that_breaks_does_not_stop_the_others(
    tmp_path, redis_server, redis_client, upstream, pusher, monkeypatch
):
    seed = random.randrange(1 << 30)
    for tag in ("a", "b"):
        pusher.push(single("follow/two", tag, [make_layer(seed + ord(tag), 4096)], docker=True))
    follow = FollowSettings(
        images=(FollowRule("follow/two:a"), FollowRule("follow/two:b")), interval=60
    )
    _client, follower, pt = follower_for(tmp_path, redis_server, upstream.url, follow)
    write_tag = pt.store.write_tag

    def disk_full_for_a(target, tag, record):
        if tag == "a":
            raise OSError(28, "No space left on device")
        return write_tag(target, tag, record)

    monkeypatch.setattr(pt.store, "write_tag", disk_full_for_a)
    report = follower.tick(force=True)
    assert report.states == {"failed": 1, "current": 1}
    a, b = pt.coord.follows.read(["docker.io/follow/two:a", "docker.io/follow/two:b"])
    assert a.state == "failed" and "No space left" in a.message
    assert b.state == "current" and pt.store.read_tag_of("docker.io/follow/two", "b")


def test_one_tick_runs_at_a_time(tmp_path, redis_server, redis_client, upstream, pusher):
    pusher.push(single("follow/once", "1", [make_layer(random.randrange(1 << 30), 4096)]))
    follow = FollowSettings(images=(FollowRule("follow/once:1"),), interval=60)
    _client, follower, pt = follower_for(tmp_path, redis_server, upstream.url, follow)
    other = pt.coord.follows.lease("another-node:1")
    assert other.acquire()  # a tick elsewhere, still fetching
    try:
        report = follower.tick(force=True)
        assert report.skipped and report.checked == 0
        assert pt.coord.follows.followed() == []
    finally:
        other.release()
    report = follower.tick(force=True)
    assert not report.skipped and report.states == {"current": 1}


def test_several_schedulers_enqueue_one_follow_tick(redis_client, tmp_path):
    from registry.config import Settings
    from workers.gc import JobScheduler

    settings = Settings(
        storage_root=tmp_path,
        gc=GcSettings(interval=3600),
        follow=FollowSettings(images=(FollowRule("library/alpine:3"),), tick=30),
    )
    first, second = JobScheduler(redis_client, settings), JobScheduler(redis_client, settings)
    enqueued = first.enqueue_jobs() + second.enqueue_jobs()
    names = sorted(job.func_name for job in enqueued)
    assert names == ["workers.follow.tick", "workers.gc.sweep"]
    assert redis_client.llen("rq:queue:pullthrough") == 2
    # Within the tick, neither schedulers nor a restarted one enqueue another.
    assert JobScheduler(redis_client, settings).enqueue_jobs() == []
    assert redis_client.llen("rq:queue:pullthrough") == 2


def test_the_command_line_and_the_ui_show_the_followed_tags_and_what_was_saved(
    tmp_path_factory, redis_server, redis_client, upstream, pusher
):
    seed = random.randrange(1 << 30)
    image = single("follow/web", "2", [make_layer(seed, 700 * 1024)], docker=True)
    pusher.push(image)
    # Its own registry name: the figures of this test are its own pulls only.
    cache = Gunicorn.with_config(
        tmp_path_factory.mktemp("follow-ui"),
        redis_server.url,
        [{"name": "hub.test", "url": upstream.url}],
        default_registry="hub.test",
        follow={"images": [{"image": "follow/web:2"}], "interval": "1h"},
    )
    try:
        run = run_module("registry", cache.config_path, "follow", "--now")
        # Not a terminal: a plain line per quarter of each blob, then the tags and a summary.
        assert re.search(r"follow/web:2 \w{12}: 100% of 0\.7 MiB", run.stderr), run.stderr
        assert "hub.test/follow/web:2: current" in run.stderr
        assert "1 followed, 1 checked (1 current)" in run.stderr

        # Clients pull: the followed tag from the cache, a tag nobody followed from upstream.
        pusher.push(single("follow/web", "3", [make_layer(seed + 1, 4096)], docker=True))
        seen = []
        for tag in ("2", "2", "2", "3"):
            answer = requests.get(
                f"{cache.url}/v2/follow/web/manifests/{tag}", headers=ACCEPT, timeout=30
            )
            seen.append(answer.headers["X-Cache"])
        saved = sum(1 for cache_state in seen if cache_state != "MISS")
        assert (saved, seen.count("MISS")) == (3, 1)
        deadline = time.monotonic() + 10
        while _metric(cache, "pullthrough_upstream_pulls_saved", period="today") != saved:
            assert time.monotonic() < deadline, "the saved pulls never reached /metrics"
            time.sleep(0.3)
        assert _metric(cache, "pullthrough_upstream_pulls_saved", period="7d") == saved

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=require("chromium"), args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page()
            page.goto(f"{cache.url}/ui/follow")
            row = page.locator("#follows tr", has_text="follow/web:2")
            cells = [c.inner_text() for c in row.locator("td").all()]
            page.goto(f"{cache.url}/")
            saved_row = [
                c.inner_text() for c in page.locator("#saved tr").nth(1).locator("td").all()
            ]
            bars = page.locator("#charts-hub\\.test g.hour")
            hours = bars.count()
            last_hour = bars.nth(hours - 1)
            hour_counts = (
                last_hour.locator("rect.saved").get_attribute("data-count"),
                last_hour.locator("rect.fetched").get_attribute("data-count"),
            )
            browser.close()
        assert cells[0] == "follow/web:2"
        assert cells[1] == "hub.test/follow/web:2"
        assert cells[2].startswith(image.digest[:19])
        assert cells[3] == "current"
        assert cells[5].startswith("in ") and cells[5].endswith(("min", "h"))
        fetched = sum(len(b) for b in image.blobs.values())
        assert cells[6] == f"{fetched / 1024:.1f} KiB"
        assert saved_row == ["hub.test", "3", "3", "1"]
        assert hours == 24 and hour_counts == ("3", "1")  # this hour: 3 saved, 1 fetched
    finally:
        cache.stop()


def _metric(cache, name: str, **labels: str) -> float | None:
    text = requests.get(f"{cache.url}/metrics", timeout=10).text
    try:
        return _sample(text, name, **labels)
    except AssertionError:
        return None


def _digest(text: str):
    from registry.digests import Digest

    return Digest.parse(text)


def test_on_a_terminal_warm_draws_progress_bars(
    tmp_path, redis_server, redis_client, upstream, pusher
):
    """The same command on a terminal (a pseudo-terminal here): tqdm's bars, not lines."""
    image = single("follow/tty", "1", [make_layer(random.randrange(1 << 30), 300 * 1024)])
    pusher.push(image)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"root": str(tmp_path / "data")},
                "redis": {"url": redis_server.url},
                "registries": [{"name": "docker.io", "url": upstream.url}],
            }
        )
    )
    leader, follower_end = pty.openpty()
    # A terminal 120 columns wide (a fresh pseudo-terminal says 0).
    fcntl.ioctl(follower_end, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    run = subprocess.Popen(
        [sys.executable, "-m", "registry", "warm", "follow/tty:1"],
        cwd=ROOT, env=module_env(config), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=follower_end,
    )  # fmt: skip
    os.close(follower_end)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        out += chunk
    assert run.wait(timeout=60) == 0
    text = out.decode(errors="replace")
    assert "100%|" in text and "█" in text, text  # a tqdm bar
    assert "% of " not in text  # not the plain lines of a pipe
    assert "2 blobs" in text and "bytes fetched" in text


def _multiarch(repository: str, tag: str, seed: int, size: int = 8 * 1024):
    from tests.support.images import index

    children = [
        single(repository, "", [make_layer(seed + n, size)], arch=arch)
        for n, arch in enumerate(["amd64", "arm64", "s390x"])
    ]
    return index(repository, tag, children)


def test_a_tag_followed_because_it_was_pulled_brings_only_the_platforms_that_were_pulled(
    tmp_path, redis_server, redis_client, upstream, pusher
):
    """The amplification: one GET of an index (no blob) made the next tick fetch every
    platform's layers, outside every per-client limit. A tag followed because it was pulled
    brings the platforms whose manifests were pulled, and for an index alone nothing more."""
    seed = random.randrange(1 << 30)
    first = _multiarch("follow/multi", "1", seed)
    pusher.push(first)
    follow = FollowSettings(pulled_within=3600.0, interval=600.0)
    client, follower, _pt = follower_for(tmp_path, redis_server, upstream.url, follow)
    wanted = {"Accept": first.media_type}
    assert client.get("/v2/follow/multi/manifests/1", headers=wanted).data == first.manifest
    mark = upstream.mark()
    report = follower.tick(force=True)
    assert report.states == {"current": 1} and report.fetched_bytes == 0
    assert blobs_asked(upstream, mark) == []

    # One platform pulled (its manifest); the tag moves: that platform's blobs alone come.
    amd64 = first.children[0]
    child = client.get(f"/v2/follow/multi/manifests/{amd64.digest}", headers=ACCEPT_OCI)
    assert child.data == amd64.manifest
    second = _multiarch("follow/multi", "1", seed + 10)
    pusher.push(second)
    mark = upstream.mark()
    report = follower.tick(force=True)
    assert report.states == {"current": 1}
    fetched = {p.rsplit("/", 1)[1] for _, p, _ in blobs_asked(upstream, mark)}
    assert fetched == set(second.children[0].blobs)
    assert report.fetched_bytes == sum(len(b) for b in second.children[0].blobs.values())


def test_the_follower_stops_at_its_byte_budget_and_says_so_on_its_page(
    tmp_path, redis_server, redis_client, upstream, pusher
):
    seed = random.randrange(1 << 30)
    image = _multiarch("follow/budget", "1", seed, size=20 * 1024)
    pusher.push(image)
    budget = 30 * 1024  # one platform's blobs, not two
    follow = FollowSettings(
        images=(FollowRule("follow/budget:1"),), interval=600.0, max_bytes=budget
    )
    client, follower, pt = follower_for(tmp_path, redis_server, upstream.url, follow)
    report = follower.tick(force=True)
    assert report.states == {"budget": 1}
    record = pt.coord.follows.read(["docker.io/follow/budget:1"])[0]
    assert record.state == FollowState.BUDGET and "follow.max_bytes" in record.message
    spent, ends = pt.coord.follows.spent()
    on_disk = sum(
        len(data)
        for child in image.children
        for digest, data in child.blobs.items()
        if pt.store.blob_size(_digest(digest)) is not None
    )
    assert 0 < spent == on_disk <= budget and 0 < ends <= 600
    page = client.get("/ui/follow").get_data(as_text=True)
    assert "budget" in page and "Fetched in this window" in page
