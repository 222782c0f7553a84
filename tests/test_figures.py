"""Every figure comes from the event that produces it: real pulls, real sweeps and real
upstream answers, compared with the truth (the files on disk, the sweep's own report, the
upstream's headers). No test here writes a Redis key of a figure it checks.

The module has a Redis of its own, so the GC totals it reads are this module's sweeps only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis as redis_lib
import requests
from prometheus_client.parser import text_string_to_metric_families

from registry.mediatypes import MANIFEST_TYPES
from tests.support.fakes import Route
from tests.support.servers import Gunicorn, RedisServer, run_module

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("figures-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, own_redis, upstream, fake):
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("figures"),
        own_redis.url,
        [{"name": "docker.io", "url": upstream.url}, {"name": "fake.test", "url": fake.url}],
        workers=2,
        gc={"delay": 0},
    )
    yield server
    server.stop()


def cli(cache, *args: str, check: bool = True):
    return run_module("registry", cache.config_path, *args, check=check)


def pull(cache, image) -> None:
    """What a client does: the manifest (and its children), then every blob."""
    base = f"{cache.url}/v2/{image.repository}"
    requests.get(f"{base}/manifests/{image.tag}", headers=ACCEPT, timeout=30).raise_for_status()
    for child in image.children:
        url = f"{base}/manifests/{child.digest}"
        requests.get(url, headers=ACCEPT, timeout=30).raise_for_status()
    for target in [image, *image.children]:
        for digest in target.blobs:
            requests.get(f"{base}/blobs/{digest}", timeout=30).raise_for_status()


def on_disk(data: Path) -> tuple[int, int]:
    """(bytes, files) of the committed blobs: the truth the storage figures must equal."""
    files = [p for p in (data / "blobs").rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def scrape(cache) -> dict[str, float]:
    text = requests.get(f"{cache.url}/metrics", timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def sweep(cache) -> dict:
    return json.loads(cli(cache, "gc").stdout)


def test_gc_and_storage_figures_equal_the_sweep_reports_and_the_disk(cache, images):
    for name in ("busybox", "ocisingle", "alpine"):
        pull(cache, images[name])
    first = sweep(cache)
    cli(cache, "evict", f"{images['ocisingle'].repository}:{images['ocisingle'].tag}")
    cli(cache, "evict", f"{images['alpine'].repository}:{images['alpine'].tag}")
    second = sweep(cache)
    assert second["freed_bytes"] > 0 and second["deleted_blobs"] > 0

    figures = scrape(cache)
    assert figures["pullthrough_gc_runs_total"] == 2
    assert (
        figures["pullthrough_gc_freed_bytes_total"] == first["freed_bytes"] + second["freed_bytes"]
    )
    size, count = on_disk(cache.data)
    assert second["store_bytes"] - second["freed_bytes"] == size
    assert figures["pullthrough_storage_bytes"] == size
    assert figures["pullthrough_storage_blobs"] == count

    # Between sweeps, a fill counts up what it commits.
    pull(cache, images["ocisingle"])
    size, count = on_disk(cache.data)
    figures = scrape(cache)
    assert figures["pullthrough_storage_bytes"] == size
    assert figures["pullthrough_storage_blobs"] == count

    # A dry run counts as no run and frees nothing.
    json.loads(cli(cache, "gc", "--dry-run").stdout)
    assert scrape(cache)["pullthrough_gc_runs_total"] == 2


def test_after_a_redis_flush_storage_is_not_counted_from_zero(cache, own_redis, images):
    """A Redis that lost pt:store must not show the few blobs filled since as the store."""
    pull(cache, images["busybox"])
    client = redis_lib.Redis.from_url(own_redis.url)
    client.flushall()
    client.close()
    pull(cache, images["multidocker"])
    assert "pullthrough_storage_bytes" not in scrape(cache)
    rebuilt = json.loads(cli(cache, "rebuild-index").stdout)
    size, count = on_disk(cache.data)
    assert (rebuilt["bytes"], rebuilt["blobs"]) == (size, count)
    figures = scrape(cache)
    assert (figures["pullthrough_storage_bytes"], figures["pullthrough_storage_blobs"]) == (
        size,
        count,
    )


def test_the_ratelimit_command_shows_what_upstream_announced(cache, fake):
    fake.routes["/v2/org/quota/manifests/1"] = Route(
        status=404,
        body=b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}',
        headers={"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "37;w=21600"},
    )
    requests.get(f"{cache.url}/v2/fake.test/org/quota/manifests/1", headers=ACCEPT, timeout=30)
    lines = [json.loads(line) for line in cli(cache, "ratelimit").stdout.splitlines()]
    line = next(line for line in lines if line["registry"] == "fake.test")
    assert (line["limit"], line["remaining"], line["window_seconds"]) == ("100", "37", "21600")
