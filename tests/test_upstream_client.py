"""The upstream client against fake registries on loopback: redirects, credentials, timeouts."""

from __future__ import annotations

import base64
import hashlib
import logging
import random
import time
from dataclasses import replace

import pytest

from registry import create_app, upstream_session
from registry.config import Credentials, RegistrySettings
from registry.errors import UpstreamUnavailable
from registry.upstream.client import UpstreamClient
from tests.conftest import make_settings
from tests.support.fakes import FakeRegistry, Route


def test_blob_redirect_is_followed_without_forwarding_authorization(
    tmp_path, redis_server, redis_client, caplog
):
    origin, cdn = FakeRegistry().start(), FakeRegistry().start()
    try:
        origin.require_authorization = "Basic " + base64.b64encode(b"me:topsecret").decode()
        data = random.randbytes(100_000)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        cdn.routes["/cdn/layer"] = Route(body=data)
        origin.routes[f"/v2/library/redir/blobs/{digest}"] = Route(
            status=307, headers={"Location": f"{cdn.url}/cdn/layer?sig=abc"}
        )
        settings = make_settings(
            tmp_path / "data",
            redis_server.url,
            origin.url,
            credentials=Credentials("me", "topsecret"),
        )
        # The CDN is another port of the upstream's own host: followed only when allowed.
        hub = replace(settings.registries[0], redirect_allow=(f"127.0.0.1:{cdn.port}",))
        settings = replace(settings, registries=(hub,))
        caplog.set_level(logging.DEBUG)
        client = create_app(settings).test_client()
        response = client.get(f"/v2/library/redir/blobs/{digest}")
        assert response.status_code == 200
        assert response.data == data
        # origin saw our credentials, the CDN never did
        assert origin.require_authorization in origin.authorizations
        assert cdn.count("GET", "/cdn/layer") == 1
        assert set(cdn.authorizations) == {None}
        assert "topsecret" not in caplog.text
    finally:
        origin.stop()
        cdn.stop()


def client_of(fake: FakeRegistry, name: str, **timeouts) -> UpstreamClient:
    """The upstream client of the fake registry, known as `name`."""
    return UpstreamClient(RegistrySettings(name, fake.url), upstream_session(), **timeouts)


def test_small_answers_get_the_short_timeout_and_blob_bodies_the_long_one(fake):
    client = client_of(fake, "slow.test", connect_timeout=1, read_timeout=5, metadata_timeout=0.5)
    fake.routes["/v2/org/slow/manifests/1"] = Route(body=b"{}", delay=3)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match=r"slow\.test .* did not answer in time"):
        client.get_manifest("org/slow", "1")
    assert time.monotonic() - started < 2

    # A blob body that pauses 1 s between chunks (longer than the metadata timeout) completes.
    data = random.randbytes(4 * 65536)
    digest = fake.add_blob("org/slow", data, trickle=1.0)
    stream = client.open_blob("org/slow", digest)
    try:
        assert b"".join(stream.chunks()) == data
    finally:
        stream.close()


def test_a_blob_body_in_http_chunks_is_read_whole_and_byte_exact(fake):
    # Blob bodies are read with read1 (whatever the socket holds, up to BLOB_READ): an
    # upstream or proxy that sends them chunked, with no Content-Length, must come out the
    # same, the chunk framing gone, across chunks that arrive apart.
    client = client_of(fake, "chunked.test", connect_timeout=5, read_timeout=10)
    data = random.randbytes(3 * 1024 * 1024 + 12345)
    digest = fake.add_blob("org/chunked", data, chunked=True, trickle=0.001)
    stream = client.open_blob("org/chunked", digest)
    try:
        assert "Content-Length" not in stream.response.headers
        assert stream.response.headers["Transfer-Encoding"] == "chunked"
        assert b"".join(stream.chunks()) == data
    finally:
        stream.close()


def test_a_404_names_what_upstream_said_is_missing(tmp_path, redis_server, redis_client):
    """The message (which podman prints) and the status line name the missing tag, or the
    repository when upstream says NAME_UNKNOWN (quay, Harbor, zot)."""
    upstream = FakeRegistry().start()
    try:
        upstream.routes["/v2/org/app/manifests/v9"] = Route(
            status=404, body=b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}'
        )
        upstream.routes["/v2/org/gone/manifests/v1"] = Route(
            status=404, body=b'{"errors":[{"code":"NAME_UNKNOWN","message":"no"}]}'
        )
        settings = make_settings(tmp_path / "data", redis_server.url, upstream.url)
        client = create_app(settings).test_client()
        tag = client.get("/v2/org/app/manifests/v9")
        assert tag.status == "404 upstream docker.io has no tag v9 in org/app"
        assert tag.json["errors"][0]["message"] == "upstream docker.io has no tag v9 in org/app"
        repo = client.get("/v2/org/gone/manifests/v1")
        assert repo.json["errors"][0]["message"] == "upstream docker.io has no repository org/gone"
        again = client.get("/v2/org/app/manifests/v9")  # remembered: no second upstream call
        assert again.json["errors"][0]["message"].startswith(
            "upstream docker.io has no tag v9 in org/app (upstream said so "
        )
        assert upstream.count("GET", "/org/app/manifests/v9") == 1
    finally:
        upstream.stop()
