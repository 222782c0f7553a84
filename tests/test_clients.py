"""Real clients through real gunicorn: skopeo pulls every kind of image through the cache and
gets byte-identical content to a direct copy from upstream; the second pull never reaches
upstream for content."""

from __future__ import annotations

import filecmp

import pytest

from tests.support.clients import skopeo_copy, skopeo_policy
from tests.support.servers import Gunicorn


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return skopeo_policy(tmp_path_factory.mktemp("skopeo"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, redis_server, upstream):
    registry = {"name": "docker.io", "url": upstream.url, "username": "reader"}
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("clients"), redis_server.url, [{**registry, "password": "readerpw"}]
    )
    yield server
    server.stop()


def same_tree(left, right) -> bool:
    names = sorted(p.name for p in left.iterdir())
    assert names == sorted(p.name for p in right.iterdir())
    _match, mismatch, errors = filecmp.cmpfiles(left, right, names, shallow=False)
    return not mismatch and not errors


@pytest.mark.parametrize(
    "reference",
    [
        "library/alpine:3.19",
        "library/busybox:1.36",
        "library/multidocker:1",
        "team/app:v1",
        "library/big:1",
        "private/secret:1",
    ],
)
def test_skopeo_copy_through_the_cache_is_byte_identical(
    cache, upstream, policy, tmp_path, reference
):
    direct = tmp_path / "direct"
    cached = tmp_path / "cached"
    creds = ("--src-creds", "reader:readerpw") if reference.startswith("private/") else ()
    skopeo_copy(policy, f"127.0.0.1:{upstream.port}/{reference}", direct, *creds)
    skopeo_copy(policy, f"127.0.0.1:{cache.port}/{reference}", cached)
    assert same_tree(direct, cached)

    mark = upstream.mark()
    again = tmp_path / "again"
    skopeo_copy(policy, f"127.0.0.1:{cache.port}/{reference}", again)
    assert same_tree(direct, again)
    # Within the tag TTL the second pull asks upstream for nothing at all.
    assert upstream.requests_since(mark) == []


def test_logs_carry_requests_but_no_credentials_or_tokens(cache):
    log = cache.log()
    assert "registry.access request client=127.0.0.1 method=GET registry=docker.io" in log
    assert "registry.upstream.client upstream registry=docker.io" in log
    assert "readerpw" not in log  # the configured upstream password
    assert "Bearer" not in log and "eyJ" not in log  # no Authorization, no JWT
