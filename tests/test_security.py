"""One client must not change what others get, and hostile input meets a clear 4xx: the points
of docs/security.md, each against the real distribution upstream or a fake one on loopback."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

from registry import create_app
from registry.config import ConfigError, Settings, settings_from_mapping
from registry.upstream.auth import TokenCache
from tests.conftest import make_settings
from tests.support.fakes import FakeRegistry, Route
from tests.support.images import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.support.servers import free_port

FULL = {"Accept": ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])}
OLD_DOCKER = {"Accept": DOCKER_MANIFEST}  # what a pre-manifest-list client sends


# -- a narrow Accept changes nobody else's answer -------------------------------------------------
def test_an_old_clients_accept_cannot_turn_a_manifest_list_into_one_platform(client, images):
    """distribution answers a client that accepts only single manifests with the amd64 one:
    stored as the tag, every client (arm64 too) would get amd64 from then on."""
    listed = images["multidocker"]
    url = f"/v2/{listed.repository}/manifests/{listed.tag}"
    old = client.get(url, headers=OLD_DOCKER)
    assert old.status_code == 404
    assert DOCKER_LIST in old.json["errors"][0]["message"]
    for _ in range(2):  # the first after the old client, and the cached one
        full = client.get(url, headers=FULL)
        assert full.status_code == 200
        assert full.headers["Docker-Content-Digest"] == listed.digest
        assert full.headers["Content-Type"] == DOCKER_LIST
    assert full.headers["X-Cache"] == "HIT"  # the old client's request stored the list
    assert client.get(url, headers=OLD_DOCKER).status_code == 404  # and it stays its own


def test_a_client_that_cannot_take_an_index_does_not_make_the_tag_missing(client, images):
    index = images["alpine"]
    url = f"/v2/{index.repository}/manifests/{index.tag}"
    assert client.get(url, headers=OLD_DOCKER).status_code == 404
    full = client.get(url, headers=FULL)  # no negative cache recorded for the tag
    assert full.status_code == 200 and full.headers["Docker-Content-Digest"] == index.digest


# -- what a browser could be made to do -----------------------------------------------------------
@pytest.fixture
def fake_upstream():
    server = FakeRegistry().start()
    yield server
    server.stop()


def fake_app(tmp_path, redis_server, fake, **overrides):
    return create_app(make_settings(tmp_path / "data", redis_server.url, fake.url, **overrides))


def test_a_manifest_served_as_html_is_never_served_back_as_html(
    tmp_path, redis_server, redis_client, fake_upstream
):
    layer = fake_upstream.add_blob("org/page", b"layer")
    config = fake_upstream.add_blob("org/page", b"{}")
    doc = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": layer, "size": 5}],
    }
    html = {"Content-Type": "text/html"}
    fake_upstream.routes["/v2/org/page/manifests/plain"] = Route(
        body=json.dumps(doc).encode(), headers=html
    )
    declared = {**doc, "mediaType": OCI_MANIFEST}
    fake_upstream.routes["/v2/org/page/manifests/declared"] = Route(
        body=json.dumps(declared).encode(), headers=html
    )
    client = fake_app(tmp_path, redis_server, fake_upstream).test_client()
    refused = client.get("/v2/org/page/manifests/plain")
    assert refused.status_code == 502
    assert "unknown manifest media type 'text/html'" in refused.json["errors"][0]["message"]
    served = client.get("/v2/org/page/manifests/declared")
    assert served.status_code == 200 and served.headers["Content-Type"] == OCI_MANIFEST


def test_registry_answers_forbid_sniffing_and_script_and_the_ui_keeps_its_policy(client):
    for path in ("/v2/", "/v2/library/nothere/manifests/x", "/metrics", "/readyz"):
        response = client.get(path)
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["Content-Security-Policy"] == "sandbox", path
    page = client.get("/")
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]


def test_only_configured_host_names_are_answered(tmp_path, redis_server, redis_client, upstream):
    """DNS rebinding: a web page's own name pointed at the cache gets nothing."""
    settings = make_settings(
        tmp_path / "data", redis_server.url, upstream.url, server_hosts=("cache.lan",)
    )
    client = create_app(settings).test_client()
    evil = client.get("/v2/", headers={"Host": "attacker.example"})
    assert evil.status_code == 400 and evil.json["errors"][0]["code"]
    assert client.get("/v2/", headers={"Host": "cache.lan:5050"}).status_code == 200
    assert client.get("/v2/", headers={"Host": "cache.lan"}).status_code == 200


# -- hostile input: 4xx, never 5xx ---------------------------------------------------------------
def test_unicode_digits_are_bad_input_not_a_500(client, images):
    assert client.get("/v2/library/busybox/tags/list?n=²").status_code == 400
    image = images["busybox"]
    client.get(f"/v2/{image.repository}/manifests/{image.tag}")
    digest, data = next(iter(image.blobs.items()))
    # A malformed Range is ignored (RFC 9110 allows it): the whole blob, not a 500.
    whole = client.get(f"/v2/{image.repository}/blobs/{digest}", headers={"Range": "bytes=²-"})
    assert whole.status_code == 200 and whole.data == data


def test_an_upstream_header_with_unicode_digits_is_its_failure_not_ours(
    tmp_path, redis_server, redis_client, fake_upstream
):
    digest = fake_upstream.add_blob("org/odd", b"x" * 1000, headers={"Content-Length": "1000"})
    fake_upstream.routes[f"/v2/org/odd/blobs/{digest}"].headers["Retry-After"] = "²"
    fake_upstream.routes[f"/v2/org/odd/blobs/{digest}"].status = 429
    client = fake_app(tmp_path, redis_server, fake_upstream).test_client()
    limited = client.get(f"/v2/org/odd/blobs/{digest}")
    assert limited.status_code == 429


def test_made_up_methods_share_one_metrics_label(client):
    assert client.open("/v2/", method="BREW").status_code == 405
    text = client.get("/metrics").get_data(as_text=True)
    assert 'method="BREW"' not in text and 'method="OTHER"' in text


# -- resources ------------------------------------------------------------------------------------
def test_readiness_writes_its_probe_file_at_most_once_per_interval(app, client):
    driver = app.extensions["pullthrough"].store.driver
    writes = []
    original = driver.write_atomic
    driver.write_atomic = lambda *args: (writes.append(args), original(*args))[1]
    for _ in range(20):
        assert client.get("/readyz").status_code == 200
    assert len(writes) == 1


def test_the_token_cache_keeps_a_bounded_number_of_tokens():
    cache = TokenCache(max_tokens=3)
    for i in range(5):
        cache.put(("upstream", f"repository:r{i}:pull", ""), f"t{i}", 300)
    assert [cache.get(("upstream", f"repository:r{i}:pull", "")) for i in range(5)] == [
        None,
        None,
        "t2",
        "t3",
        "t4",
    ]


def test_a_redis_failure_names_no_host_or_port_to_clients(tmp_path, upstream, images):
    port = free_port()
    settings = make_settings(tmp_path / "data", f"redis://127.0.0.1:{port}/0", upstream.url)
    client = create_app(settings).test_client()
    image = images["busybox"]
    failed = client.get(f"/v2/{image.repository}/blobs/{next(iter(image.blobs))}")
    assert failed.status == "503 cache coordination store (Redis) unavailable"
    assert str(port) not in failed.get_data(as_text=True)


# -- configuration --------------------------------------------------------------------------------
def registry_config(url: str, **extra) -> dict:
    return {"registries": [{"name": "docker.io", "url": url, **extra}]}


def test_credentials_in_a_url_are_refused():
    with pytest.raises(ConfigError) as refused:
        settings_from_mapping(registry_config("https://me:secret@registry.example"), env={})
    assert "Credentials do not belong in the URL" in str(refused.value)
    assert "secret" not in str(refused.value)


def test_a_credential_keyed_by_registry_name_goes_only_to_that_registrys_host(tmp_path, caplog):
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"docker.io": {"username": "me", "password": "pw"}}))
    os.chmod(path, 0o644)
    caplog.set_level(logging.WARNING)
    hub = settings_from_mapping({"credentials_file": str(path)}, env={})
    assert hub.registries[0].credentials is not None  # registry-1.docker.io: docker.io's own
    assert "can be read by other users" in caplog.text
    mirror = settings_from_mapping(
        {"credentials_file": str(path), **registry_config("https://mirror.example")}, env={}
    )
    assert mirror.registries[0].credentials is None
    os.chmod(path, 0o600)
    caplog.clear()
    settings_from_mapping({"credentials_file": str(path)}, env={})
    assert "can be read by other users" not in caplog.text


def test_settings_do_not_show_the_redis_password():
    settings = Settings(storage_root="/x", redis_url="redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in repr(settings)


# -- where an upstream may lead us ----------------------------------------------------------------
class Bystander:
    """A server on 127.0.0.2 that the cache must never be led to (the cloud metadata service,
    Redis, an admin page): it counts what reaches it."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hits.append(self.path)
                body = b"internal secret"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.url = f"http://127.0.0.2:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def bystander():
    server = Bystander()
    yield server
    server.stop()


def redirecting_app(tmp_path, redis_server, fake_upstream, bystander, **registry):
    import hashlib

    from registry.config import RegistrySettings

    digest = "sha256:" + hashlib.sha256(b"internal secret").hexdigest()
    fake_upstream.routes[f"/v2/org/app/blobs/{digest}"] = Route(
        status=307, headers={"Location": f"{bystander.url}/latest/meta-data/"}
    )
    upstream = RegistrySettings("docker.io", fake_upstream.url, **registry)
    settings = Settings(
        storage_root=tmp_path / "data", redis_url=redis_server.url, registries=(upstream,)
    )
    return create_app(settings).test_client(), digest


def test_a_redirect_to_a_private_address_is_not_followed(
    tmp_path, redis_server, redis_client, fake_upstream, bystander
):
    client, digest = redirecting_app(tmp_path, redis_server, fake_upstream, bystander)
    refused = client.get(f"/v2/org/app/blobs/{digest}")
    assert refused.status_code == 502
    assert "127.0.0.2" in refused.json["errors"][0]["message"]
    assert "not followed" in refused.json["errors"][0]["message"]
    assert bystander.hits == []


def test_redirect_allow_lets_a_private_mirror_through(
    tmp_path, redis_server, redis_client, fake_upstream, bystander
):
    client, digest = redirecting_app(
        tmp_path, redis_server, fake_upstream, bystander, redirect_allow=("127.0.0.2",)
    )
    served = client.get(f"/v2/org/app/blobs/{digest}")
    assert served.status_code == 200 and served.data == b"internal secret"
    assert bystander.hits == ["/latest/meta-data/"]


def challenge_with_realm(fake: FakeRegistry, realm: str) -> None:
    """The upstream answers org/app:1 with a bearer challenge naming `realm`."""
    fake.routes["/v2/org/app/manifests/1"] = Route(
        status=401,
        body=b"{}",
        headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="x"'},
    )


def test_a_token_realm_on_a_private_address_gets_no_request(
    tmp_path, redis_server, redis_client, fake_upstream, bystander
):
    challenge_with_realm(fake_upstream, f"{bystander.url}/token")
    client = fake_app(tmp_path, redis_server, fake_upstream).test_client()
    refused = client.get("/v2/org/app/manifests/1")
    assert refused.status_code == 502 and "token service" in refused.json["errors"][0]["message"]
    assert bystander.hits == []


def test_credentials_never_go_to_a_plain_http_realm_on_another_host(
    tmp_path, redis_server, redis_client, fake_upstream, bystander
):
    from registry.config import Credentials, RegistrySettings

    challenge_with_realm(fake_upstream, f"{bystander.url}/token")
    upstream = RegistrySettings(
        "docker.io",
        fake_upstream.url,
        credentials=Credentials("me", "pw"),
        redirect_allow=("127.0.0.2",),
    )
    settings = Settings(
        storage_root=tmp_path / "data", redis_url=redis_server.url, registries=(upstream,)
    )
    refused = create_app(settings).test_client().get("/v2/org/app/manifests/1")
    assert refused.status_code == 502
    assert "the credentials are not sent there" in refused.json["errors"][0]["message"]
    assert bystander.hits == []


def test_an_https_upstream_cannot_redirect_down_to_plain_http():
    import requests as requests_lib

    from registry.config import RegistrySettings
    from registry.errors import UpstreamError
    from registry.upstream.client import UpstreamClient

    client = UpstreamClient(
        RegistrySettings("docker.io", "https://registry.example"),
        requests_lib.Session(),
        connect_timeout=1,
        read_timeout=1,
    )
    with pytest.raises(UpstreamError, match="from https to plain http"):
        client._check_hop("http://cdn.example/blob", "https://registry.example/v2/x", "redirected")


# -- one repository's blobs are not another's ----------------------------------------------------
def test_a_fill_of_a_private_blob_cannot_be_joined_through_another_repository(
    tmp_path, redis_server, redis_client, fake_upstream
):
    """The fill of org/private's layer is in flight; a request for the same digest under
    org/public (which upstream says has no such blob) must not stream a byte of it."""
    import threading

    secret = os.urandom(600 * 1024)
    digest = fake_upstream.add_blob("org/private", secret, trickle=0.05)  # about 0.5 s
    client = fake_app(tmp_path, redis_server, fake_upstream).test_client()
    got: dict[str, bytes] = {}
    owner = threading.Thread(
        target=lambda: got.setdefault("owner", client.get(f"/v2/org/private/blobs/{digest}").data)
    )
    owner.start()
    deadline = time.monotonic() + 5
    while redis_client.hget(f"pt:fill:{digest}", "state") != b"streaming":
        assert time.monotonic() < deadline, "the fill never started"
        time.sleep(0.01)
    other = client.get(f"/v2/org/public/blobs/{digest}")
    owner.join()
    assert other.status_code == 404 and secret[:1000] not in other.data
    assert got["owner"] == secret
    assert fake_upstream.count("HEAD", f"/org/public/blobs/{digest}") == 1


def test_a_manifest_naming_a_digest_does_not_give_its_repository_that_blob(
    tmp_path, redis_server, redis_client, fake_upstream
):
    """A manifest anyone can push to a public repository, naming a private layer's digest,
    does not make that layer readable through the public repository."""
    secret = os.urandom(10_000)
    digest = fake_upstream.add_blob("org/private", secret)
    config = fake_upstream.add_blob("org/public", b"{}")
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": digest, "size": 10_000}],
    }
    fake_upstream.routes["/v2/org/public/manifests/bait"] = Route(
        body=json.dumps(doc).encode(), headers={"Content-Type": OCI_MANIFEST}
    )
    client = fake_app(tmp_path, redis_server, fake_upstream).test_client()
    assert client.get(f"/v2/org/private/blobs/{digest}").data == secret  # cached now
    assert client.get("/v2/org/public/manifests/bait").status_code == 200
    leaked = client.get(f"/v2/org/public/blobs/{digest}")
    assert leaked.status_code == 404 and leaked.data != secret


# -- what unauthenticated clients can pile up ----------------------------------------------------
def test_fills_beyond_the_limits_get_a_429_with_retry_after(
    tmp_path, redis_server, redis_client, fake_upstream
):
    import threading

    slow = [fake_upstream.add_blob("org/app", os.urandom(300 * 1024), trickle=0.05)]
    slow += [fake_upstream.add_blob("org/app", os.urandom(300 * 1024), trickle=0.05)]
    client = fake_app(
        tmp_path, redis_server, fake_upstream, max_fills=3, max_fills_per_client=1
    ).test_client()
    first = threading.Thread(target=lambda: client.get(f"/v2/org/app/blobs/{slow[0]}"))
    first.start()
    deadline = time.monotonic() + 5
    while redis_client.zcard("pt:fills") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    busy = client.get(f"/v2/org/app/blobs/{slow[1]}")  # the same client address
    assert busy.status_code == 429 and busy.headers["Retry-After"] == "5"
    assert "1 blob fills of this client are running" in busy.status
    other = client.get(
        f"/v2/org/app/blobs/{slow[1]}", environ_overrides={"REMOTE_ADDR": "127.0.0.9"}
    )
    assert other.status_code == 200 and len(other.data) == 300 * 1024
    first.join()
    assert redis_client.zcard("pt:fills") == 0  # each fill let go of its slot


def test_a_missing_blob_is_remembered_and_its_record_is_short_lived(
    tmp_path, redis_server, redis_client, fake_upstream
):
    client = fake_app(tmp_path, redis_server, fake_upstream).test_client()
    digest = "sha256:" + "1" * 64
    for _ in range(3):
        assert client.get(f"/v2/org/app/blobs/{digest}").status_code == 404
    assert fake_upstream.count("GET", f"/org/app/blobs/{digest}") == 1
    assert 0 < redis_client.ttl(f"pt:fill:{digest}") <= 120


def test_a_client_over_its_upstream_budget_gets_a_429_but_cached_tags_stay_served(
    tmp_path, redis_server, redis_client, upstream, images
):
    settings = make_settings(
        tmp_path / "data", redis_server.url, upstream.url, client_upstream_per_minute=3, tag_ttl=0
    )
    client = create_app(settings).test_client()
    image = images["busybox"]
    url = f"/v2/{image.repository}/manifests/{image.tag}"
    assert client.get(url, headers=FULL).status_code == 200  # 1
    answers = [client.get(url, headers=FULL) for _ in range(3)]  # 2, 3, then over
    assert answers[-1].status_code == 200 and answers[-1].headers["X-Cache"] == "STALE"
    missing = client.get(f"/v2/{image.repository}/manifests/other", headers=FULL)
    assert missing.status_code == 429 and int(missing.headers["Retry-After"]) <= 60
    assert "requests that reach upstream this minute" in missing.status
    elsewhere = client.get(url, headers=FULL, environ_overrides={"REMOTE_ADDR": "127.0.0.9"})
    assert elsewhere.headers["X-Cache"] in ("REVALIDATED", "HIT")


def test_a_429_stops_upstream_calls_for_at_most_the_configured_back_off(
    tmp_path, redis_server, redis_client, fake_upstream
):
    fake_upstream.routes["/v2/org/app/manifests/1"] = Route(
        status=429, body=b"{}", headers={"Retry-After": "21600"}
    )
    client = fake_app(
        tmp_path, redis_server, fake_upstream, rate_limit_max_backoff=120
    ).test_client()
    limited = client.get("/v2/org/app/manifests/1")
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "120"
    assert 0 < redis_client.pttl("pt:upstream:docker.io:breaker") <= 120_000


def test_a_tag_upstream_stopped_confirming_is_not_served_past_max_stale(
    tmp_path, redis_server, redis_client, fake_upstream
):
    config = fake_upstream.add_blob("org/app", b"{}")
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
           "config": {"mediaType": "application/json", "digest": config, "size": 2}}  # fmt: skip
    fake_upstream.routes["/v2/org/app/manifests/1"] = Route(
        body=json.dumps(doc).encode(), headers={"Content-Type": OCI_MANIFEST}
    )
    clock = [time.time()]
    app = fake_app(tmp_path, redis_server, fake_upstream, tag_ttl=60, max_stale=3600)
    app.extensions["pullthrough"].clock = lambda: clock[0]
    client = app.test_client()
    assert client.get("/v2/org/app/manifests/1").status_code == 200
    # Withdrawn upstream: the account is refused from now on.
    fake_upstream.routes["/v2/org/app/manifests/1"] = Route(status=403, body=b"{}")
    clock[0] += 600
    assert client.get("/v2/org/app/manifests/1").headers["X-Cache"] == "STALE"
    clock[0] += 3600
    gone = client.get("/v2/org/app/manifests/1")
    assert gone.status_code == 404 and "denied access" in gone.json["errors"][0]["message"]


def test_stored_files_are_not_readable_by_other_users(client, images, settings):
    image = images["busybox"]
    client.get(f"/v2/{image.repository}/manifests/{image.tag}")
    for digest in image.blobs:
        assert client.get(f"/v2/{image.repository}/blobs/{digest}").data  # committed now
    files = [p for p in (settings.storage_root / "blobs").rglob("*") if p.is_file()]
    files += [p for p in (settings.storage_root / "repositories").rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o007 == 0 for p in files), [
        (str(p), oct(p.stat().st_mode)) for p in files if p.stat().st_mode & 0o007
    ]
    assert settings.storage_root.stat().st_mode & 0o007 == 0
