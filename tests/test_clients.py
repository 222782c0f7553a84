"""Real clients through real gunicorn: skopeo pulls every kind of image through the cache and
gets byte-identical content to a direct copy from upstream; the second pull never reaches
upstream for content."""

from __future__ import annotations

import filecmp
import json
import subprocess

import pytest
import yaml

from tests.support.servers import Gunicorn, require


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("skopeo") / "policy.json"
    path.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, redis_server, upstream):
    workdir = tmp_path_factory.mktemp("clients")
    config = {
        "storage": {"root": str(workdir / "data")},
        "redis": {"url": redis_server.url},
        "registries": [
            {
                "name": "docker.io",
                "url": upstream.url,
                "username": "reader",
                "password": "readerpw",
            },
        ],
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    server = Gunicorn(path, workdir, workers=3).start()
    yield server
    server.stop()


def skopeo_copy(policy, source: str, dest, *creds: str) -> None:
    subprocess.run(
        [
            require("skopeo"),
            "--policy",
            str(policy),
            "copy",
            "--all",
            "--retry-times",
            "0",
            "--src-tls-verify=false",
            *creds,
            f"docker://{source}",
            f"dir:{dest}",
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )


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
