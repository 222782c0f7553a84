"""The web UI in a real headless browser (Debian's chromium driven by Playwright) against a
cache under gunicorn that real pulls have populated. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import json
import time

import pytest
import redis as redis_lib
import requests
import yaml

from registry.mediatypes import MANIFEST_TYPES
from registry.ui.views import human_bytes
from tests.support.servers import ROOT, Gunicorn, free_port, run_module

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}
ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, redis_server, upstream, images):
    # Indexes left by other modules' caches would show up in this one's catalog.
    redis_lib.Redis.from_url(redis_server.url).flushall()
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("ui"),
        redis_server.url,
        [{"name": "docker.io", "url": upstream.url}],
        workers=2,
    )
    # Real pulls: alpine (an index, both platforms), busybox twice. What the clients were told
    # (X-Cache) and received is the truth the overview's figures must equal.
    server.seen = {"answers": [], "hit": 0, "miss": 0}

    def get(url: str, **kwargs) -> None:
        response = requests.get(url, timeout=30, **kwargs)
        assert response.status_code == 200
        answer = response.headers["X-Cache"].lower()
        server.seen["answers"].append(answer)
        server.seen[answer] += len(response.content)

    for name in ("alpine", "busybox"):
        image = images[name]
        url = f"{server.url}/v2/{image.repository}/manifests/{image.tag}"
        for _ in range(2):
            get(url, headers=ACCEPT)
        for child in image.children:
            get(f"{server.url}/v2/{image.repository}/manifests/{child.digest}", headers=ACCEPT)
        for target in [image, *image.children]:
            for digest in target.blobs:
                get(f"{server.url}/v2/{image.repository}/blobs/{digest}")
    # Thousands of repositories are paged: 150 more are in the store (a manifest revision
    # each, as a pull leaves it).
    for i in range(150):
        revision = server.data / "repositories" / "docker.io" / f"bulk/repo{i:03d}"
        revision = revision / "_manifests" / "revisions" / "sha256" / ("0" * 64)
        revision.parent.mkdir(parents=True)
        revision.write_text("application/vnd.oci.image.manifest.v1+json")
    # Redis was flushed above and nothing has listed the catalog yet: the first listing
    # builds its index from the store.
    yield server
    server.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.dialogs = dialogs
    yield page
    context.close()


def blob_size(cache, digest: str) -> int:
    hexpart = digest.split(":")[1]
    return (cache.data / "blobs" / "sha256" / hexpart[:2] / hexpart).stat().st_size


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"), full_page=True)
    assert (ARTIFACTS / f"ui-{name}.png").stat().st_size > 1000


def test_overview_shows_hit_ratio_traffic_and_upstream_health(cache, page):
    answers = cache.seen["answers"]
    hits, misses = answers.count("hit"), answers.count("miss")
    page.goto(cache.url + "/")
    ratio = page.inner_text("#hit-ratio .big")
    assert ratio == f"{100 * hits / len(answers):.1f} %", (ratio, answers)
    assert f"{hits} hits, 0 revalidated, 0 stale, {misses} misses" in page.inner_text("#hit-ratio")
    served = page.inner_text("#bytes")
    assert human_bytes(cache.seen["hit"]) in served.split("from cache")[0], served
    assert f"{human_bytes(cache.seen['miss'])} streamed from upstream" in served, served
    assert "from cache" in page.inner_text("#bytes")
    upstreams = page.inner_text("#upstreams")
    assert "docker.io" in upstreams and "healthy" in upstreams
    shot(page, "overview")


def test_the_disk_card_counts_the_store_from_its_first_fill(cache, page):
    """No sweep has run yet: the fills counted the store from empty."""
    files = [p for p in (cache.data / "blobs").rglob("*") if p.is_file()]
    page.goto(cache.url + "/")
    disk = page.inner_text("#disk")
    size = sum(p.stat().st_size for p in files)
    assert human_bytes(size) in disk and f"{len(files)} blobs" in disk, disk


def test_the_pull_charts_have_a_labelled_time_axis(cache, page):
    page.goto(cache.url + "/")
    chart = page.locator("#charts-docker\\.io svg").first
    deadline = time.monotonic() + 5  # each worker writes its hourly counts every 2 s
    while not chart.count() and time.monotonic() < deadline:
        time.sleep(0.5)
        page.reload()
    labels = [t.text_content() or "" for t in chart.locator("text.x-label").all()]
    assert len(labels) == 8, labels  # 24 hours, one label every 3
    assert all(int(text[:2]) % 3 == 0 and text.endswith(":00") for text in labels), labels
    assert chart.locator("text.x-title").text_content() == "hour (UTC)"
    assert chart.locator("text.y-title").text_content() == "manifest GETs per hour"
    values = [t.text_content() or "" for t in chart.locator("text.y-label").all()]
    # The value axis runs from 0 to the busiest hour: this module's manifest GETs.
    assert values[1] == "0" and int(values[0]) >= 1
    assert chart.locator("g.hour").count() == 24
    shot(page, "overview-charts")


def test_repositories_are_searchable_and_paged(cache, page):
    page.goto(cache.url + "/ui/repositories")
    assert "152 repositories" in page.inner_text("#count")
    assert page.locator("#repositories tr").count() == 51  # header + 50
    page.click("#next")
    assert "page 2 of 4" in page.inner_text(".pager")
    page.fill("input[name=q]", "alp")
    page.press("input[name=q]", "Enter")
    page.wait_for_url("**q=alp**")
    rows = page.locator("#repositories tr")
    assert rows.count() == 2 and "library/alpine" in rows.nth(1).inner_text()
    shot(page, "repositories")


def test_repository_page_lists_tags_with_platforms_size_and_pulls(cache, page, images):
    page.goto(cache.url + "/ui/repositories")
    page.fill("input[name=q]", "alpine")
    page.press("input[name=q]", "Enter")
    page.click("text=library/alpine")
    page.wait_for_url("**/ui/repositories/library/alpine")
    row = page.locator("#tags tr").nth(1).inner_text()
    assert "3.19" in row
    assert "linux/amd64" in row and "linux/arm64" in row
    assert images["alpine"].digest[:19] in row
    # Size: config and layers of both platforms, as stored; pulls: the two tag GETs made.
    size = sum(
        blob_size(cache, digest) for child in images["alpine"].children for digest in child.blobs
    )
    cells = row.split("\t")
    assert human_bytes(size) in cells[3] and "fresh" in row
    deadline = time.monotonic() + 5  # counts gathered in each worker reach Redis within 2 s
    while cells[5].strip() != "2" and time.monotonic() < deadline:
        time.sleep(0.5)
        page.reload()
        cells = page.locator("#tags tr").nth(1).inner_text().split("\t")
    assert cells[5].strip() == "2", cells
    assert cells[4].strip().endswith("s ago") or "min ago" in cells[4], cells
    shot(page, "repository")


def test_setup_page_has_this_servers_daemon_json_and_hosts_toml(cache, page):
    page.goto(cache.url + "/ui/setup")
    assert f'"registry-mirrors": ["{cache.url}"]' in page.inner_text("#daemon-json")
    assert f'[host."{cache.url}"]' in page.inner_text("#hosts-toml")
    shot(page, "setup")


def test_user_input_is_escaped(cache, page):
    attack = '<img src=x onerror="alert(1)">'
    page.goto(cache.url + "/ui/repositories?q=" + requests.utils.quote(attack))
    assert attack in page.inner_text("#count")  # shown as text, not markup
    assert page.locator("#count img").count() == 0
    page.goto(cache.url + "/ui/repositories/" + requests.utils.quote("<b>x</b>"))
    assert "Not found" in page.inner_text("h1")
    assert page.dialogs == []


def test_overview_shows_a_failed_gc_run_whose_report_has_no_counts(cache, page, tmp_path):
    # A real sweep that fails before counting anything: its store (an S3 endpoint) is down.
    config = yaml.safe_load(cache.config_path.read_text())
    config["storage"] = {
        "driver": "s3",
        "s3": {"endpoint": f"http://127.0.0.1:{free_port()}", "bucket": "gone"},
    }
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    failed = run_module("registry", broken, "gc", check=False)
    assert failed.returncode == 1 and "S3 bucket gone" in failed.stderr
    assert "Traceback" not in failed.stderr
    page.goto(cache.url + "/")
    gc = page.inner_text("#gc")
    assert "S3 bucket gone" in gc and "freed 0 B" in gc


def test_overview_disk_card_shows_what_is_on_disk_after_a_sweep(cache, page):
    report = json.loads(run_module("registry", cache.config_path, "gc").stdout)
    files = [p for p in (cache.data / "blobs").rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    assert report["store_bytes"] - report["freed_bytes"] == size
    page.goto(cache.url + "/")
    disk = page.inner_text("#disk")
    assert human_bytes(size) in disk and f"{len(files)} blobs" in disk
    shot(page, "overview-after-gc")
