"""The upstream client against fake registries on loopback: redirects and credentials."""

from __future__ import annotations

import base64
import hashlib
import logging
import random

from registry import create_app
from registry.config import Credentials
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
