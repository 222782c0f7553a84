"""An upstream is input: what a hostile or broken upstream sends (tag lists, digests, `Link`
pages, `Retry-After`, token answers, oversized bodies) gets the grammar and the bounds a
client's request gets, and can reach nothing outside its own registry's repositories."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import pytest
import requests
import urllib3

from registry import create_app
from registry.config import FollowRule, FollowSettings, RegistrySettings
from registry.pullthrough.follower import Follower
from tests.conftest import make_settings
from tests.support.fakes import FakeRegistry, Route
from tests.support.images import OCI_MANIFEST, make_layer, single

ACCEPT = {"Accept": OCI_MANIFEST}
TRAVERSAL = "1/../../../../../../docker.io/library/alpine/_manifests/tags/3.19"


def _serve(fake: FakeRegistry, repository: str, reference: str, image) -> None:
    """A manifest at `reference`, where a client's URL lands after urllib3's dot-segment
    normalisation (as requests sends it)."""
    headers = {"Content-Type": image.media_type, "Docker-Content-Digest": image.digest}
    path = urllib3.util.parse_url(f"http://x/v2/{repository}/manifests/{reference}").path
    fake.routes[path] = Route(body=image.manifest, headers=headers)
    for digest, data in image.blobs.items():
        fake.add_blob(repository, data)
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()


def _files(root) -> set[str]:
    return {
        os.path.relpath(os.path.join(where, name), root)
        for where, _, names in os.walk(root)
        for name in names
    }


def test_a_tag_in_an_upstreams_tag_list_cannot_rewrite_another_registrys_tag(
    tmp_path, redis_server, redis_client, upstream, images
):
    """The reproduction: a follow rule `evil.example/x/y:1*` and an upstream whose tag list
    holds `1/../../…/docker.io/library/alpine/_manifests/tags/3.19` rewrote docker.io's
    alpine:3.19 (then served as a HIT with the upstream's digest). Upstream tags get the
    client's grammar, no glob crosses `/`, and the store refuses any other name."""
    evil = FakeRegistry().start()
    try:
        planted = single("x/y", "", [make_layer(91, 4096)])
        for tag in (TRAVERSAL, "1.0"):
            _serve(evil, "x/y", tag, planted)
        listing = json.dumps({"name": "x/y", "tags": [TRAVERSAL, "1.0", "1*", "1\x00"]})
        evil.routes["/v2/x/y/tags/list"] = Route(body=listing.encode())
        settings = make_settings(tmp_path / "data", redis_server.url, upstream.url)
        follow = FollowSettings(images=(FollowRule("evil.example/x/y:1*"),), interval=60)
        settings = replace(
            settings,
            registries=(*settings.registries, RegistrySettings("evil.example", evil.url)),
            follow=follow,
        )
        app = create_app(settings)
        client = app.test_client()
        alpine = images["alpine"]
        pulled = client.get(
            "/v2/library/alpine/manifests/3.19", headers={"Accept": alpine.media_type}
        )
        assert pulled.headers["Docker-Content-Digest"] == alpine.digest
        before = _files(settings.storage_root)

        pt = app.extensions["pullthrough"]
        report = Follower(pt, pt.coord.follows, follow).tick(force=True)

        assert sorted(pt.coord.follows.followed()) == ["evil.example/x/y:1.0"]
        assert report.states == {"current": 1}
        again = client.get(
            "/v2/library/alpine/manifests/3.19", headers={"Accept": alpine.media_type}
        )
        assert again.headers["Docker-Content-Digest"] == alpine.digest
        record = pt.store.read_tag_of("docker.io/library/alpine", "3.19")
        assert record is not None and str(record.digest) == alpine.digest
        written = _files(settings.storage_root) - before
        outside = {
            f for f in written if f.startswith("repositories/") and "/evil.example/x/y/" not in f
        }
        assert written and not outside, sorted(outside)
    finally:
        evil.stop()


@pytest.mark.parametrize(
    "name, tag",
    [
        ("docker.io/library/alpine", "../../x"),
        ("docker.io/library/alpine", "a/b"),
        ("docker.io/../x", "1"),
        ("../../etc", "1"),
        ("docker.io/Library/alpine", "1"),
    ],
)
def test_the_store_refuses_a_name_or_tag_outside_the_grammar(tmp_path, name, tag):
    """No caller can forget: the store's paths are built only from valid names and tags."""
    from registry.errors import RegistryError
    from registry.store import paths

    with pytest.raises(RegistryError):
        paths.tag(name, tag)


def test_a_hostile_digest_header_is_the_upstreams_failure_not_a_400(
    tmp_path, redis_server, redis_client
):
    """A `Docker-Content-Digest` that is no digest is upstream's fault: a 502 naming it
    (before, a 400 DIGEST_INVALID blamed the client)."""
    fake = FakeRegistry().start()
    try:
        image = single("x/y", "", [make_layer(92, 1024)])
        fake.routes["/v2/x/y/manifests/1"] = Route(
            body=image.manifest,
            headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": "sha256:../../x"},
        )
        settings = make_settings(tmp_path / "data", redis_server.url, fake.url)
        answer = create_app(settings).test_client().get("/v2/x/y/manifests/1", headers=ACCEPT)
        assert answer.status_code == 502
        assert "Docker-Content-Digest" in answer.json["errors"][0]["message"]
    finally:
        fake.stop()


def test_a_token_lifetime_of_1e999_is_clamped_not_a_500(tmp_path, redis_server, redis_client):
    fake = FakeRegistry().start()
    try:
        image = single("x/y", "", [make_layer(93, 1024)])
        _serve(fake, "x/y", "1", image)
        fake.routes["/token"] = Route(body=b'{"token": "t", "expires_in": 1e999}')
        fake.require_authorization = "Bearer t"
        fake_challenge(fake)
        settings = make_settings(tmp_path / "data", redis_server.url, fake.url)
        answer = create_app(settings).test_client().get("/v2/x/y/manifests/1", headers=ACCEPT)
        assert answer.status_code == 200
        ttl = [redis_client.pttl(k) for k in redis_client.scan_iter("pt:token*")]
        assert ttl and all(0 < t <= 86400 * 1000 for t in ttl), ttl
    finally:
        fake.stop()


def fake_challenge(fake: FakeRegistry) -> None:
    fake.challenge = f'Bearer realm="{fake.url}/token",service="fake"'


def test_upstream_retry_after_is_parsed_and_never_relayed_as_text(
    tmp_path, redis_server, redis_client
):
    fake = FakeRegistry().start()
    try:
        fake.routes["/v2/x/y/manifests/1"] = Route(
            status=429, headers={"Retry-After": "soon <script>alert(1)</script>"}
        )
        fake.routes["/v2/x/z/manifests/1"] = Route(status=429, headers={"Retry-After": "120"})
        settings = make_settings(tmp_path / "data", redis_server.url, fake.url)
        client = create_app(settings).test_client()
        hostile = client.get("/v2/x/y/manifests/1", headers=ACCEPT)
        assert hostile.status_code == 429
        assert "Retry-After" not in hostile.headers
        assert "script" not in hostile.headers.get("Retry-After", "") + hostile.status
        redis_client.flushall()  # the breaker the first 429 opened
        plain = create_app(settings).test_client().get("/v2/x/z/manifests/1", headers=ACCEPT)
        assert plain.status_code == 429 and plain.headers["Retry-After"] == "120"
    finally:
        fake.stop()


def test_an_oversized_tag_list_is_refused_not_read_whole(tmp_path, redis_server, redis_client):
    fake = FakeRegistry().start()
    try:
        tags = [f"t{n:07d}" for n in range(500_000)]  # about 6 MiB of JSON
        fake.routes["/v2/x/y/tags/list"] = Route(body=json.dumps({"tags": tags}).encode())
        settings = make_settings(tmp_path / "data", redis_server.url, fake.url)
        answer = create_app(settings).test_client().get("/v2/x/y/tags/list")
        # Not cached either: the listing fails with what upstream did.
        assert answer.status_code == 404
        assert "over" in answer.json["errors"][0]["message"]
    finally:
        fake.stop()


def test_a_blob_redirect_to_another_port_of_the_upstreams_own_host_is_refused(
    tmp_path, redis_server, redis_client
):
    """The reproduction reached Redis on the upstream's host: a redirect's host and port
    must both be the upstream's own (or listed in redirect_allow)."""
    fake = FakeRegistry().start()
    try:
        data = os.urandom(2048)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        redis_port = redis_server.url.rsplit(":", 1)[1].split("/")[0]
        fake.routes[f"/v2/x/y/blobs/{digest}"] = Route(
            status=307, headers={"Location": f"http://127.0.0.1:{redis_port}/x"}
        )
        settings = make_settings(tmp_path / "data", redis_server.url, fake.url)
        answer = create_app(settings).test_client().get(f"/v2/x/y/blobs/{digest}")
        assert answer.status_code == 502
        assert "not globally routable" in answer.json["errors"][0]["message"]
        assert requests.get(f"{fake.url}/v2/", timeout=5).status_code == 200
    finally:
        fake.stop()


@pytest.mark.parametrize(
    "address", ["100.100.100.200", "100.64.0.1", "169.254.169.254", "10.1.2.3", "::ffff:127.0.0.1"]
)
def test_a_redirect_to_an_address_that_is_not_globally_routable_is_refused(
    tmp_path, redis_server, redis_client, address
):
    """CGNAT and Tailscale's 100.64.0.0/10 (Alibaba's metadata service at 100.100.100.200)
    are not private in `ipaddress`'s terms, and were followed: now whatever is not
    globally routable is refused, checked before any connection."""
    from registry.upstream.connection import UpstreamConnection

    fake = FakeRegistry().start()
    try:
        connection = UpstreamConnection(
            RegistrySettings("docker.io", fake.url),
            requests.Session(),
            connect_timeout=1,
            read_timeout=1,
        )
        host = f"[{address}]" if ":" in address else address
        with pytest.raises(Exception, match="not globally routable"):
            connection._check_hop(f"http://{host}/latest/", f"{fake.url}/v2/x", "redirected")
    finally:
        fake.stop()


def test_server_hosts_compare_ports_when_given_and_names_without_case(
    tmp_path, redis_server, redis_client, upstream
):
    settings = make_settings(
        tmp_path / "data", redis_server.url, upstream.url,
        server_hosts=("Cache.LAN:5050", "mirror.lan", ".home.arpa"),
    )  # fmt: skip
    client = create_app(settings).test_client()

    def status(host: str) -> int:
        return client.get("/v2/", headers={"Host": host}).status_code

    assert status("cache.lan:5050") == 200 and status("CACHE.lan:5050") == 200
    assert status("cache.lan:5051") == 400 and status("cache.lan") == 400
    assert status("mirror.lan") == 200 and status("MIRROR.LAN:8080") == 200
    assert status("nas.home.arpa:5050") == 200 and status("evil.arpa") == 400
    # Probes name the pod's address: health answers under any name.
    assert client.get("/healthz", headers={"Host": "10.244.0.7:5050"}).status_code == 200


def test_per_client_limits_count_an_ipv6_client_by_its_64():
    from registry.coordination.limits import client_key

    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
