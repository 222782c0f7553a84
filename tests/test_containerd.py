"""containerd as Docker 29 pulls through a mirror: `ctr images pull --hosts-dir` with a
`hosts.toml` per registry and a `_default` one. No `/v2/` ping, `?ns=<registry>` on every
request: the cache routes on it and the image unpacks byte-identical."""

from __future__ import annotations

import re

import pytest

from tests.support.fakes import Route
from tests.support.servers import Containerd, Gunicorn, free_port

HOSTS = """\
{server}
[host."{cache}"]
  capabilities = ["pull", "resolve"]
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory, redis_server, upstream, fake):
    body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"pull rate limit"}]}'
    fake.routes["/v2/org/quota/manifests/1"] = Route(
        status=429, body=body, headers={"Retry-After": "3600"}
    )
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("containerd-cache"),
        redis_server.url,
        [
            {"name": "docker.io", "url": upstream.url},
            {"name": "registry.example.test", "url": upstream.url},
            {"name": "down.test", "url": f"http://127.0.0.1:{free_port()}"},
            {"name": "limited.test", "url": fake.url},
        ],
        env={"GUNICORN_CMD_ARGS": "--access-logfile -"},
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def containerd(tmp_path_factory):
    daemon = Containerd(tmp_path_factory.mktemp("containerd")).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def hosts_dir(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("certs.d")
    for registry, server in (
        ("docker.io", 'server = "https://registry-1.docker.io"\n'),
        ("_default", ""),
    ):
        (root / registry).mkdir()
        (root / registry / "hosts.toml").write_text(HOSTS.format(server=server, cache=cache.url))
    return root


def requests_seen(cache) -> list[str]:
    """Request lines (`GET /v2/...?ns=... HTTP/1.1`) from gunicorn's access log."""
    return re.findall(r'"((?:GET|HEAD) \S+) HTTP/1\.1"', cache.log())


def test_ctr_pulls_docker_hub_through_the_mirror_with_ns(cache, containerd, hosts_dir, images):
    image = images["busybox"]
    ref = f"docker.io/{image.repository}:{image.tag}"
    before = len(requests_seen(cache))
    pulled = containerd.ctr(
        "images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native", ref
    )
    assert pulled.returncode == 0, pulled.stderr
    listed = containerd.ctr("images", "ls").stdout
    assert ref in listed and image.digest in listed
    seen = requests_seen(cache)[before:]
    assert seen, "containerd never reached the cache"
    assert all("ns=docker.io" in line for line in seen), seen
    assert not any(line.split()[1].split("?")[0] == "/v2/" for line in seen)  # no ping
    # Layers were unpacked from what the cache served: the root filesystem exists.
    assert containerd.ctr("snapshots", "--snapshotter", "native", "ls").stdout.count("\n") >= 2


def test_default_mirror_routes_any_configured_registry(cache, containerd, hosts_dir, images):
    image = images["alpine"]  # an index: containerd picks its platform's child
    ref = f"registry.example.test/{image.repository}:{image.tag}"
    before = len(requests_seen(cache))
    pulled = containerd.ctr(
        "images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native", ref
    )
    assert pulled.returncode == 0, pulled.stderr
    assert image.digest in containerd.ctr("images", "ls").stdout
    seen = requests_seen(cache)[before:]
    assert seen and all("ns=registry.example.test" in line for line in seen), seen


@pytest.fixture(scope="module")
def dead_end_hosts(tmp_path_factory, cache):
    """hosts.toml whose own server is a dead loopback port: what the mirror cannot serve
    fails here, and ctr prints the mirror's answer (its first error), not the internet's."""
    root = tmp_path_factory.mktemp("certs.d-dead-end")
    server = f'server = "http://127.0.0.1:{free_port()}"\n'
    (root / "_default").mkdir()
    (root / "_default" / "hosts.toml").write_text(HOSTS.format(server=server, cache=cache.url))
    return root


def ctr_pull(containerd, hosts: str, ref: str) -> str:
    pulled = containerd.ctr(
        "images", "pull", "--hosts-dir", hosts, "--snapshotter", "native", ref, check=False
    )
    assert pulled.returncode != 0
    return pulled.stdout + pulled.stderr


def test_ctr_prints_the_cause_of_an_uncached_image_with_the_upstream_down(
    containerd, dead_end_hosts
):
    out = ctr_pull(containerd, str(dead_end_hosts), "down.test/library/app:1")
    assert "503 down.test unreachable (refused the connection), not cached" in out, out


def test_ctr_prints_the_cause_of_a_rate_limit(containerd, dead_end_hosts):
    out = ctr_pull(containerd, str(dead_end_hosts), "limited.test/org/quota:1")
    # The upstream asked for 3600 s; one 429 stops calls for at most rate_limit_max_backoff.
    assert "429 limited.test rate limit reached, not cached; retry in 900 s" in out, out


def test_ctr_says_the_mirror_has_no_missing_tag(containerd, dead_end_hosts, cache):
    """containerd asks with HEAD and prints no body or reason for a 404: what it shows is
    that the mirror answered 404 (and then its next host's error)."""
    out = ctr_pull(containerd, str(dead_end_hosts), "registry.example.test/library/busybox:nope")
    host = cache.url.removeprefix("http://")
    assert f'response was http.StatusNotFound" host="{host}"' in out, out
