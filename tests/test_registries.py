"""Several upstream registries through one cache: Docker Hub's token flavour (the session
upstream), a registry with HTTP Basic auth and an anonymous one, all real distribution
instances holding the same repository name with different content. Both routes (containerd's
`?ns=` and the path prefix) with real skopeo pulls; registries never mix, identical layers are
stored once."""

from __future__ import annotations

import pytest
import requests

from registry.mediatypes import MANIFEST_TYPES
from tests.support.clients import skopeo_copy, skopeo_policy
from tests.support.images import Pusher, make_layer, single
from tests.support.servers import Distribution, Gunicorn
from tests.test_clients import same_tree

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}
BASIC = ("puller", "s3cret-pw")


@pytest.fixture(scope="module")
def shared_layer():
    return make_layer(301, 150_000, "shared.bin")


@pytest.fixture(scope="module")
def anon(tmp_path_factory, shared_layer):
    registry = Distribution(tmp_path_factory.mktemp("anon")).start()
    image = single("team/app", "v1", [shared_layer, make_layer(302, 40_000)])
    Pusher(registry.url).push(image)
    registry.image = image
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def basic(tmp_path_factory, shared_layer):
    registry = Distribution(tmp_path_factory.mktemp("basic"), basic=BASIC).start()
    image = single("team/app", "v1", [shared_layer, make_layer(303, 50_000)], docker=True)
    Pusher(registry.url, basic=BASIC).push(image)
    registry.image = image
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, redis_server, upstream, anon, basic):
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("registries"),
        redis_server.url,
        [
            {"name": "docker.io", "url": upstream.url},
            {"name": "anon.test", "url": anon.url},
            {"name": "basic.test", "url": basic.url, "username": BASIC[0], "password": BASIC[1]},
        ],
    )
    yield server
    server.stop()


def test_path_prefix_route_pulls_each_registrys_own_image_with_skopeo(
    cache, upstream, anon, basic, tmp_path
):
    policy = skopeo_policy(tmp_path)
    host = f"127.0.0.1:{cache.port}"
    cases = [
        (f"{host}/anon.test/team/app:v1", f"127.0.0.1:{anon.port}/team/app:v1", ()),
        (
            f"{host}/basic.test/team/app:v1",
            f"127.0.0.1:{basic.port}/team/app:v1",
            ("--src-creds", ":".join(BASIC)),
        ),
        (f"{host}/team/app:v1", f"127.0.0.1:{upstream.port}/team/app:v1", ()),
    ]
    for i, (through_cache, direct, creds) in enumerate(cases):
        skopeo_copy(policy, direct, tmp_path / f"direct{i}", *creds)
        skopeo_copy(policy, through_cache, tmp_path / f"cached{i}")
        assert same_tree(tmp_path / f"direct{i}", tmp_path / f"cached{i}"), through_cache
    manifests = {(tmp_path / f"cached{i}" / "manifest.json").read_bytes() for i in range(3)}
    assert len(manifests) == 3  # same name, three registries, three images


def test_ns_route_echoes_the_namespace_and_refuses_unconfigured_ones(cache, anon, basic):
    for registry, name in ((anon, "anon.test"), (basic, "basic.test")):
        response = requests.get(
            f"{cache.url}/v2/team/app/manifests/v1?ns={name}", headers=ACCEPT, timeout=30
        )
        assert response.status_code == 200
        assert response.content == registry.image.manifest
        assert response.headers["OCI-Namespace"] == name
    refused = requests.get(f"{cache.url}/v2/team/app/manifests/v1?ns=ghcr.io", timeout=30)
    assert refused.status_code == 404
    error = refused.json()["errors"][0]
    assert error["code"] == "NAME_UNKNOWN" and "ghcr.io" in error["message"]


def test_registries_stay_apart_while_identical_layers_are_stored_once(
    cache, anon, basic, shared_layer
):
    for name in ("anon.test", "basic.test"):
        url = f"{cache.url}/v2/{name}/team/app/blobs/{shared_layer.digest}"
        assert requests.get(url, timeout=30).content == shared_layer.data
    copies = list(cache.data.joinpath("blobs").rglob(shared_layer.digest.split(":")[1]))
    assert len(copies) == 1
    catalog = requests.get(f"{cache.url}/v2/_catalog", timeout=30).json()["repositories"]
    assert {"anon.test/team/app", "basic.test/team/app", "team/app"} <= set(catalog)
    # anon's layer is not basic's: each repository serves only what it was entitled to.
    only_anon = next(d for d in anon.image.blobs if d not in basic.image.blobs)
    denied = requests.get(f"{cache.url}/v2/basic.test/team/app/blobs/{only_anon}", timeout=30)
    assert denied.status_code == 404
