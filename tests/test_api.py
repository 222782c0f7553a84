"""The v2 read API against a real distribution upstream (token auth) and a real Redis."""

from __future__ import annotations

import json
import time

import pytest

from registry import create_app
from registry.config import Credentials
from registry.digests import Digest
from tests.conftest import make_settings
from tests.support.images import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST


def pulls_of(upstream, mark, kind):
    """Upstream GETs that returned content (the 401 challenges before them do not count)."""
    return [
        r
        for r in upstream.requests_since(mark)
        if f"/{kind}/" in r[1] and r[0] == "GET" and r[2] < 400
    ]


def test_every_response_carries_the_api_version_header(client):
    for path in ("/v2/", "/v2/library/nothere/manifests/x", "/nope", "/v2/_catalog"):
        assert client.get(path).headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_manifest_by_tag_is_byte_exact_with_type_digest_and_length(client, images):
    busybox = images["busybox"]
    response = client.get("/v2/library/busybox/manifests/1.36")
    assert response.status_code == 200
    assert response.data == busybox.manifest
    assert response.headers["Content-Type"] == DOCKER_MANIFEST
    assert response.headers["Docker-Content-Digest"] == busybox.digest
    assert response.headers["Content-Length"] == str(len(busybox.manifest))


def test_head_manifest_has_length_and_digest_but_no_body(client, images):
    busybox = images["busybox"]
    response = client.head("/v2/library/busybox/manifests/1.36")
    assert response.status_code == 200
    assert response.data == b""
    assert response.headers["Content-Length"] == str(len(busybox.manifest))
    assert response.headers["Docker-Content-Digest"] == busybox.digest
    # and once cached, HEAD answers the same from disk
    again = client.head("/v2/library/busybox/manifests/1.36")
    assert again.headers["Content-Length"] == str(len(busybox.manifest))
    assert again.headers["X-Cache"] == "HIT"


def test_index_children_are_fetched_lazily_only_when_asked(client, images, upstream, settings):
    alpine = images["alpine"]
    mark = upstream.mark()
    assert client.get("/v2/library/alpine/manifests/3.19").data == alpine.manifest
    fetched = pulls_of(upstream, mark, "manifests")
    assert len(fetched) == 1 and fetched[0][1].endswith("/manifests/3.19")
    assert pulls_of(upstream, mark, "blobs") == []
    amd64 = alpine.children[0]
    response = client.get(f"/v2/library/alpine/manifests/{amd64.digest}")
    assert response.data == amd64.manifest
    assert response.headers["Content-Type"] == OCI_MANIFEST
    # the arm64 child was never asked for, so it is not on disk
    arm64 = alpine.children[1].digest.split(":")[1]
    assert not (settings.storage_root / "blobs" / "sha256" / arm64[:2] / arm64).exists()


def test_accept_values_from_several_headers_are_forwarded(client, images):
    response = client.get(
        "/v2/library/alpine/manifests/3.19",
        headers=[("Accept", f"{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.9"), ("Accept", OCI_INDEX)],
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert response.data == images["alpine"].manifest


def test_cached_manifest_of_a_type_the_client_does_not_accept_is_404(client, images):
    alpine = images["alpine"]
    assert client.get(f"/v2/library/alpine/manifests/{alpine.digest}").status_code == 200
    response = client.get(
        f"/v2/library/alpine/manifests/{alpine.digest}", headers={"Accept": DOCKER_MANIFEST}
    )
    assert response.status_code == 404
    assert response.json["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_single_component_names_map_to_library(client, images):
    by_short = client.get("/v2/busybox/manifests/1.36")
    by_full = client.get("/v2/library/busybox/manifests/1.36")
    assert by_short.data == by_full.data == images["busybox"].manifest


def test_containerd_ns_parameter_without_ping(client, images):
    response = client.get("/v2/library/busybox/manifests/1.36?ns=docker.io")
    assert response.status_code == 200
    assert response.headers["OCI-Namespace"] == "docker.io"
    unknown = client.get("/v2/library/busybox/manifests/1.36?ns=ghcr.io")
    assert unknown.status_code == 404
    assert unknown.json["errors"][0]["code"] == "NAME_UNKNOWN"
    assert "ghcr.io" in unknown.json["errors"][0]["message"]


def test_blob_full_and_ranges(client, images):
    busybox = images["busybox"]
    digest, data = max(busybox.blobs.items(), key=lambda kv: len(kv[1]))
    url = f"/v2/library/busybox/blobs/{digest}"
    client.get("/v2/library/busybox/manifests/1.36")
    full = client.get(url)
    assert full.status_code == 200 and full.data == data
    assert full.headers["Docker-Content-Digest"] == digest
    assert full.headers["Content-Length"] == str(len(data))
    size = len(data)
    cases = {
        "bytes=10-": (10, size - 1),
        "bytes=10-19": (10, 19),
        "bytes=-100": (size - 100, size - 1),
        f"bytes=5-{size + 100}": (5, size - 1),
    }
    for header, (start, end) in cases.items():
        part = client.get(url, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
        assert part.data == data[start : end + 1]
        assert part.headers["Content-Length"] == str(end - start + 1)
    bad = client.get(url, headers={"Range": f"bytes={size}-"})
    assert bad.status_code == 416
    assert bad.headers["Content-Range"] == f"bytes */{size}"
    assert bad.json["errors"][0]["code"] == "RANGE_INVALID"
    head = client.head(url, headers={"Range": "bytes=10-19"})
    assert head.status_code == 206 and head.headers["Content-Length"] == "10"


def test_range_on_a_cold_blob_is_a_206_from_the_fill(client, images):
    ocisingle = images["ocisingle"]
    client.get("/v2/team/app/manifests/v1")
    digest, data = max(ocisingle.blobs.items(), key=lambda kv: len(kv[1]))
    part = client.get(f"/v2/team/app/blobs/{digest}", headers={"Range": "bytes=100-"})
    assert part.status_code == 206
    assert part.data == data[100:]


def test_second_pull_is_served_from_disk(client, images, upstream):
    alpine = images["alpine"]
    child = alpine.children[0]

    def pull():
        assert client.get("/v2/library/alpine/manifests/3.19").status_code == 200
        assert client.get(f"/v2/library/alpine/manifests/{child.digest}").status_code == 200
        for digest, data in child.blobs.items():
            assert client.get(f"/v2/library/alpine/blobs/{digest}").data == data

    pull()
    mark = upstream.mark()
    pull()
    assert upstream.requests_since(mark) == []


def test_a_damaged_cached_manifest_is_never_served_but_fetched_again(
    client, images, upstream, settings, redis_client
):
    busybox = images["busybox"]
    assert client.get("/v2/library/busybox/manifests/1.36").data == busybox.manifest
    hexpart = busybox.digest.split(":")[1]
    path = settings.storage_root / "blobs" / "sha256" / hexpart[:2] / hexpart
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x20  # same size, one bit off: a stat would not notice
    path.write_bytes(bytes(damaged))
    # Another process (a fresh app) reads the disk: by tag and by digest it must fetch again.
    other = create_app(settings, redis_client=redis_client).test_client()
    mark = upstream.mark()
    for ref in ("1.36", busybox.digest):
        response = other.get(f"/v2/library/busybox/manifests/{ref}")
        assert response.status_code == 200
        assert response.data == busybox.manifest
    assert len(pulls_of(upstream, mark, "manifests")) >= 1
    assert path.read_bytes() == busybox.manifest  # repaired on disk


def test_a_revision_removed_from_disk_is_not_answered_from_memory(
    client, images, upstream, settings
):
    busybox = images["busybox"]
    url = f"/v2/library/busybox/manifests/{busybox.digest}"
    assert client.get(url).status_code == 200
    assert client.get(url).headers["X-Cache"] == "HIT"  # the media type is remembered now
    revision = (
        settings.storage_root
        / "repositories/docker.io/library/busybox/_manifests/revisions"
        / "sha256"
        / busybox.digest.split(":")[1]
    )
    revision.unlink()  # as GC or `evict` do
    mark = upstream.mark()
    again = client.get(url)
    assert again.status_code == 200 and again.data == busybox.manifest
    assert again.headers["X-Cache"] == "MISS"  # asked upstream: the disk decides
    assert len(pulls_of(upstream, mark, "manifests")) == 1


def test_identical_layers_are_stored_once(client, images, settings):
    shared = next(d for d in images["busybox"].blobs if d in images["alpine"].children[0].blobs)
    client.get("/v2/library/busybox/manifests/1.36")
    client.get(f"/v2/library/alpine/manifests/{images['alpine'].children[0].digest}")
    # Reading each body to its end waits for the fill's commit (the last byte waits for it).
    data = images["busybox"].blobs[shared]
    assert client.get(f"/v2/library/busybox/blobs/{shared}").data == data
    assert client.get(f"/v2/library/alpine/blobs/{shared}").data == data
    copies = list((settings.storage_root / "blobs").rglob(shared.split(":")[1]))
    assert len(copies) == 1


def test_push_and_delete_endpoints_answer_405_unsupported(client, images):
    digest = images["busybox"].digest
    for method, path in [
        ("POST", "/v2/library/busybox/blobs/uploads/"),
        ("PATCH", "/v2/library/busybox/blobs/uploads/abc"),
        ("PUT", "/v2/library/busybox/blobs/uploads/abc?digest=" + digest),
        ("PUT", "/v2/library/busybox/manifests/1.36"),
        ("DELETE", "/v2/library/busybox/manifests/1.36"),
        ("DELETE", f"/v2/library/busybox/blobs/{digest}"),
    ]:
        response = client.open(path, method=method)
        assert response.status_code == 405, (method, path)
        assert response.json["errors"][0]["code"] == "UNSUPPORTED"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/library/busybox/manifests/sha256:totallywrong", 404, "MANIFEST_UNKNOWN"),
        ("/v2/library/busybox/blobs/sha256:totallywrong", 400, "DIGEST_INVALID"),
        ("/v2/library/busybox/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("/v2/library/busybox/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("/v2/Library/busybox/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library/../../etc/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library/%2e%2e/x/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library/busybox/manifests/bad%20tag", 404, "MANIFEST_UNKNOWN"),
        ("/v2/" + "a/" * 200 + "manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library/nothere/manifests/latest", 404, "MANIFEST_UNKNOWN"),
        ("/v2/library/busybox/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("/v2/library/busybox/tags/list?n=abc", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/nope", 404, "NOT_FOUND"),
    ],
)
def test_bad_requests_get_oci_errors(client, path, status, code):
    response = client.get(path)
    assert response.status_code == status, response.data
    body = response.json
    assert body["errors"][0]["code"] == code
    assert set(body["errors"][0]) == {"code", "message", "detail"}


def test_upstream_down_names_the_upstream_for_uncached_and_serves_cached(
    tmp_path, redis_server, redis_client, upstream, images
):
    from tests.support.servers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(
        tmp_path / "data", redis_server.url, upstream.url, connect_timeout=1, read_timeout=2
    )
    warm = create_app(settings).test_client()
    busybox = images["busybox"]
    assert warm.get("/v2/library/busybox/manifests/1.36").status_code == 200
    layer = next(iter(busybox.blobs))
    # Read to the end: the last byte waits for the fill's commit.
    assert warm.get(f"/v2/library/busybox/blobs/{layer}").data == busybox.blobs[layer]

    offline = make_settings(
        tmp_path / "data", redis_server.url, dead, connect_timeout=1, read_timeout=2
    )
    client = create_app(offline).test_client()
    assert client.get("/v2/library/busybox/manifests/1.36").data == busybox.manifest
    assert client.get(f"/v2/library/busybox/manifests/{busybox.digest}").status_code == 200
    assert client.get(f"/v2/library/busybox/blobs/{layer}").data == busybox.blobs[layer]
    missing = client.get("/v2/library/alpine/manifests/3.19")
    assert missing.status_code == 503
    message = missing.json["errors"][0]["message"]
    assert "docker.io" in message and dead in message


def _blob_file(settings, digest: str):
    hexpart = digest.split(":")[1]
    return settings.storage_root / "blobs" / "sha256" / hexpart[:2] / hexpart


def test_flushall_loses_nothing_cached(client, images, redis_client, upstream, settings):
    busybox = images["busybox"]
    client.get("/v2/library/busybox/manifests/1.36")
    for digest, data in busybox.blobs.items():
        assert client.get(f"/v2/library/busybox/blobs/{digest}").data == data
    # The last byte reaches the client just before the fill's commit: what is cached is
    # what is committed, so wait for that before wiping Redis.
    deadline = time.monotonic() + 10
    while not all(_blob_file(settings, d).exists() for d in busybox.blobs):
        assert time.monotonic() < deadline, "fills never committed"
        time.sleep(0.05)
    assert client.get("/v2/_catalog").json == {"repositories": ["library/busybox"]}
    redis_client.flushall()
    mark = upstream.mark()
    assert client.get(f"/v2/library/busybox/manifests/{busybox.digest}").data == busybox.manifest
    for digest, data in busybox.blobs.items():
        assert client.get(f"/v2/library/busybox/blobs/{digest}").data == data
    assert [r for r in upstream.requests_since(mark) if "/blobs/" in r[1]] == []
    assert client.get("/v2/_catalog").json == {"repositories": ["library/busybox"]}


def test_fill_stopped_after_its_last_byte_is_committed_without_fetching_again(
    client, images, upstream, settings
):
    """A process that died between a fill's last byte and its commit left the whole blob as
    an upload. The next fill asks upstream for the rest, learns (416, `bytes */SIZE`) that
    there is none, verifies what it holds and commits it: no byte of the blob is fetched."""
    busybox = images["busybox"]
    digest, data = max(busybox.blobs.items(), key=lambda item: len(item[1]))
    store = client.application.extensions["pullthrough"].store
    upload = store.open_upload(Digest.parse(digest), len(data))
    upload.pwrite(data, 0)
    mark = upstream.mark()
    response = client.get(f"/v2/library/busybox/blobs/{digest}")
    assert response.status_code == 200 and response.data == data
    asked = [r for r in upstream.requests_since(mark) if digest in r[1] and r[2] != 401]
    assert asked == [("GET", f"/v2/library/busybox/blobs/{digest}", 416)]
    assert _blob_file(settings, digest).read_bytes() == data


def test_private_repository_needs_credentials_and_never_leaks(
    tmp_path, redis_server, redis_client, upstream, images, caplog
):
    private = images["private"]
    secret_layer = next(d for d, b in private.blobs.items() if len(b) > 1000)
    anonymous = create_app(
        make_settings(tmp_path / "data", redis_server.url, upstream.url)
    ).test_client()
    denied = anonymous.get("/v2/private/secret/manifests/1")
    assert denied.status_code == 404
    assert "docker.io" in denied.json["errors"][0]["message"]

    reader = create_app(
        make_settings(
            tmp_path / "data",
            redis_server.url,
            upstream.url,
            credentials=Credentials("reader", "readerpw"),
        )
    ).test_client()
    assert reader.get("/v2/private/secret/manifests/1").data == private.manifest
    assert (
        reader.get(f"/v2/private/secret/blobs/{secret_layer}").data == private.blobs[secret_layer]
    )

    # The layer is on disk now; asking for it under a public name must not hand it out.
    leak = anonymous.get(f"/v2/library/busybox/blobs/{secret_layer}")
    assert leak.status_code == 404
    assert leak.json["errors"][0]["code"] == "BLOB_UNKNOWN"
    leak = reader.get(f"/v2/library/busybox/blobs/{secret_layer}")
    assert leak.status_code == 404
    # ... nor through the manifest endpoint
    assert anonymous.get(f"/v2/library/busybox/manifests/{private.digest}").status_code == 404
    assert "readerpw" not in caplog.text


def test_tags_list_passes_through_with_pagination_and_falls_back_to_cache(
    client, tmp_path, redis_server, images
):
    listing = client.get("/v2/library/alpine/tags/list")
    assert listing.json == {"name": "library/alpine", "tags": ["3.19"]}
    client.get("/v2/team/app/manifests/v1")
    page = client.get("/v2/team/app/tags/list?n=1")
    assert page.json["tags"] == ["v1"]
    assert page.headers["Link"] == '</v2/team/app/tags/list?n=1&last=v1>; rel="next"'

    from tests.support.servers import free_port

    offline = make_settings(
        tmp_path / "data", redis_server.url, f"http://127.0.0.1:{free_port()}", connect_timeout=1
    )
    cached = create_app(offline).test_client().get("/v2/team/app/tags/list")
    assert cached.json == {"name": "team/app", "tags": ["v1"]}


def test_catalog_paginates_with_link_headers(client):
    for path in (
        "/v2/library/busybox/manifests/1.36",
        "/v2/library/alpine/manifests/3.19",
        "/v2/team/app/manifests/v1",
    ):
        assert client.get(path).status_code == 200
    first = client.get("/v2/_catalog?n=2")
    assert first.json == {"repositories": ["library/alpine", "library/busybox"]}
    assert first.headers["Link"] == '</v2/_catalog?n=2&last=library%2Fbusybox>; rel="next"'
    second = client.get("/v2/_catalog?n=2&last=library/busybox")
    assert second.json == {"repositories": ["team/app"]}
    assert "Link" not in second.headers


def test_manifest_and_blob_list_docker_manifest_list(client, images):
    multi = images["multidocker"]
    response = client.get("/v2/library/multidocker/manifests/1")
    assert response.data == multi.manifest
    assert json.loads(response.data)["mediaType"].endswith("manifest.list.v2+json")
    child = multi.children[1]
    assert client.get(f"/v2/library/multidocker/manifests/{child.digest}").data == child.manifest


def test_bearer_token_is_fetched_once_and_reused_until_expiry(client, images, token_server):
    before = len(token_server.requests)
    assert client.get("/v2/library/busybox/manifests/1.36").status_code == 200
    for digest, data in images["busybox"].blobs.items():
        assert client.get(f"/v2/library/busybox/blobs/{digest}").data == data
    asked = [
        r
        for r in token_server.requests[before:]
        if "repository:library/busybox:pull" in r["scopes"]
    ]
    assert len(asked) == 1
