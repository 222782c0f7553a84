"""The Hosts page keeps the table operators keep by hand: skopeo (the path prefix), podman (a
registries.conf mirror), containerd (hosts.toml, `?ns=`) and the Docker daemon
(registry-mirrors) each pull an image through the cache, and the page, read in Chromium,
lists each with the engine and version it runs (the installed packages say which), its
route, one pull, the bytes it received (the image's manifest and blobs as the upstream holds
them; skopeo's copy on disk), its hit ratio and its last error; the setup page says what to
change for the Docker host whose pull failed; /metrics and the overview count the same."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
import redis as redis_lib
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from registry import create_app
from registry.config import settings_from_mapping
from registry.coordination.hosts import Hosts
from registry.ui.views import human_bytes
from tests.support.clients import Dockerd, Podman, skopeo_copy, skopeo_policy
from tests.support.servers import ROOT, Containerd, Gunicorn, RedisServer, require

ARTIFACTS = ROOT / "tests" / "artifacts"
HOSTS_TOML = '[host."{cache}"]\n  capabilities = ["pull", "resolve"]\n'


def installed_version(command: list[str], pattern: str) -> str:
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    found = re.search(pattern, out)
    assert found, out
    return found.group(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, upstream):
    # A Redis of its own: the table must hold this module's clients only.
    redis = RedisServer(tmp_path_factory.mktemp("hosts-redis")).start()
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("hosts"),
        redis.url,
        [{"name": "docker.io", "url": upstream.url}],
        workers=2,
        hosts={"names": {"127.0.0.1": "loopback-box"}},
    )
    yield server
    server.stop()
    redis.stop()


@pytest.fixture(scope="module")
def pulled(cache, images, tmp_path_factory):
    """Each engine pulls busybox, skopeo first (the cache's misses); Docker then asks for a
    tag that does not exist. Returns what each received, by engine."""
    image = images["busybox"]
    work = tmp_path_factory.mktemp("hosts-clients")
    host = cache.url.removeprefix("http://")
    received = {}

    copy = work / "skopeo-copy"
    skopeo_copy(skopeo_policy(work), f"{host}/docker.io/{image.repository}:{image.tag}", copy)
    received["skopeo"] = sum(p.stat().st_size for p in copy.iterdir() if p.name != "version")

    # The others have the image from the upstream's own bytes: its manifest and blobs.
    content = len(image.manifest) + sum(len(blob) for blob in image.blobs.values())

    podman = Podman(work / "podman")
    podman.mirror({"docker.io": host})
    try:
        done = podman.run("pull", "--quiet", f"docker.io/{image.repository}:{image.tag}")
        assert done.returncode == 0, done.stderr
        received["containers-image"] = content
    finally:
        podman.close()

    containerd = Containerd(work / "containerd").start()
    try:
        hosts_dir = work / "certs.d"
        (hosts_dir / "docker.io").mkdir(parents=True)
        (hosts_dir / "docker.io" / "hosts.toml").write_text(HOSTS_TOML.format(cache=cache.url))
        containerd.ctr(
            *("images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native"),
            f"docker.io/{image.repository}:{image.tag}",
        )
        received["containerd"] = content
    finally:
        containerd.stop()

    docker = Dockerd(work / "dockerd", cache.url).start()
    try:
        done = docker.docker("pull", f"{image.repository}:{image.tag}", check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        received["docker"] = content
        assert docker.docker("pull", "busybox:nosuchtag", check=False).returncode != 0
    finally:
        docker.stop()
    return received


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    yield context.new_page()
    context.close()


def versions() -> dict[str, str]:
    """What each engine's installed package says it is (podman: the containers/image
    library it was built with, which is what its User-Agent names)."""
    built_using = ["dpkg-query", "-W", "-f=${Built-Using}", "podman"]
    return {
        "skopeo": installed_version([require("skopeo"), "--version"], r"version (\S+)"),
        "containers-image": installed_version(
            built_using, r"golang-github-containers-image \(= ([^-)]+)"
        ),
        "containerd": installed_version([require("ctr"), "--version"], r"containerd (\S+)"),
        "docker": installed_version([require("dockerd"), "--version"], r"version ([^,]+),"),
    }


def rows(page) -> dict[str, dict[str, str]]:
    out = {}
    for row in page.locator("#hosts tr.host").all():
        data = {
            name: row.get_attribute(f"data-{name}")
            for name in ("engine", "version", "route", "pulls", "bytes", "hits", "answered")
        }
        data["text"] = row.inner_text()
        data["error-status"] = row.get_attribute("data-error-status")
        out[row.get_attribute("data-client")] = data
    return out


def test_the_hosts_page_lists_each_engine_that_pulled_with_what_it_got(cache, pulled, page):
    page.goto(cache.url + "/ui/hosts")
    found = rows(page)
    expected_routes = {
        "skopeo": "prefix",
        "containers-image": "mirror",
        "containerd": "ns",
        "docker": "mirror",
    }
    installed = versions()
    for engine, route in expected_routes.items():
        row = found.get(f"{engine}@127.0.0.1")
        assert row is not None, (engine, list(found))
        assert row["engine"] == engine and row["version"] == installed[engine], row
        assert row["route"] == route, row
        assert row["pulls"] == "1", row
        assert int(row["bytes"]) == pulled[engine], (engine, row, pulled[engine])
        assert human_bytes(pulled[engine]) in row["text"]
        assert "loopback-box" in row["text"] and "stale" not in row["text"]
    # skopeo came first: every answer a miss; the others were served from the cache.
    assert found["skopeo@127.0.0.1"]["hits"] == "0"
    assert "0 %" in found["skopeo@127.0.0.1"]["text"]
    for engine in ("containers-image", "containerd", "docker"):
        row = found[f"{engine}@127.0.0.1"]
        assert row["hits"] == row["answered"] != "0", row
        assert "100 %" in row["text"]
    docker = found["docker@127.0.0.1"]
    assert docker["error-status"] == "404"
    assert "upstream docker.io has no tag nosuchtag in library/busybox" in docker["text"]
    assert all(
        found[f"{e}@127.0.0.1"]["error-status"] == "" for e in expected_routes if e != "docker"
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-hosts.png"), full_page=True)


def test_the_setup_page_says_what_to_change_for_the_docker_host_whose_pull_failed(
    cache, pulled, page
):
    page.goto(cache.url + "/ui/setup")
    failing = page.locator("#failing tr.failing")
    assert failing.count() == 1
    row = failing.first
    assert row.get_attribute("data-client") == "docker@127.0.0.1"
    assert "registry-1.docker.io" in page.inner_text("#failing")
    assert "does not exist upstream" in row.inner_text()


def test_metrics_and_the_overview_count_the_same_clients(cache, pulled, page):
    deadline = time.monotonic() + 10
    while True:
        text = requests.get(f"{cache.url}/metrics", timeout=10).text
        samples = {
            (s.name, s.labels.get("engine") or s.labels.get("period")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith(("pullthrough_client_", "pullthrough_hosts_seen"))
        }
        if samples.get(("pullthrough_client_pulls_total", "docker")) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for engine, size in pulled.items():
        assert samples[("pullthrough_client_pulls_total", engine)] == 1, samples
        assert samples[("pullthrough_client_bytes_total", engine)] == size, samples
    assert samples[("pullthrough_hosts_seen", "1d")] == 1
    page.goto(cache.url + "/")
    assert page.inner_text("#hosts-seen .big") == "1"


def test_the_table_keeps_at_most_hosts_max_clients_dropping_the_least_recently_seen(tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    try:
        client = redis_lib.Redis.from_url(redis.url)
        hosts = Hosts(client, max_clients=3)
        for n in range(5):  # five clients, one a flush apart
            hosts.note(f"10.0.0.{n}", "docker", "20.10", "docker/20.10", "mirror", {"pulls": 1})
            hosts.flush()
            time.sleep(0.01)
        assert [row.address for row in hosts.rows()] == ["10.0.0.4", "10.0.0.3", "10.0.0.2"]
        # The dropped clients' rows went with them.
        assert sorted(k.decode() for k in client.keys("pt:host:*")) == [
            "pt:host:docker@10.0.0.2",
            "pt:host:docker@10.0.0.3",
            "pt:host:docker@10.0.0.4",
        ]
        client.close()
    finally:
        redis.stop()


def test_a_client_not_seen_for_stale_after_is_marked_stale(cache, pulled, page, monkeypatch):
    """Read by the page as it would be once hosts.stale_after (7 days) has passed."""
    page.goto(cache.url + "/ui/hosts")
    assert "stale" not in page.inner_text("#hosts")
    week_later = time.time() + 7 * 86400 + 60
    app = create_app(settings_from_mapping(yaml.safe_load(cache.config_path.read_text()), env={}))
    monkeypatch.setattr("registry.ui.views.time.time", lambda: week_later)
    later = app.test_client().get("/ui/hosts").get_data(as_text=True)
    assert later.count('class="host stale"') == 4
