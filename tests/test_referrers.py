"""OCI 1.1 referrers through the cache: from distribution 2.8 (no referrers API: the referrers
tag schema) and from an upstream with the API (a fake: paginated answers, signatures added
later, failures); the artifacts themselves pull through byte-exact with skopeo; the GC keeps an
image's referrers while it keeps the image and drops them with it."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest
import requests

from registry import create_app
from registry.config import GcSettings
from registry.coordination import Coordination
from registry.digests import Digest
from registry.gc import Collector
from registry.store import ContentStore
from registry.store.filesystem import FilesystemDriver
from tests.conftest import make_settings
from tests.support.clients import skopeo_copy, skopeo_policy
from tests.support.cosign import (
    SBOM_ARTIFACT_TYPE,
    SIG_ARTIFACT_TYPE,
    Key,
    referrer_descriptor,
    sbom_image,
    signature_image,
    tag_schema_index,
)
from tests.support.fakes import Route
from tests.support.images import OCI_INDEX, Pusher, make_layer, sha256, single
from tests.support.servers import Gunicorn

REFERRERS_TTL = 2


@pytest.fixture(scope="module")
def attached(upstream, token_server):
    """An image with an OCI 1.1 signature and an SBOM (found through the tag schema), one
    with a legacy `.sig` tag, and one with nothing attached, pushed to distribution."""
    key = Key.generate()
    image = single("refs/app", "1", [make_layer(101, 40 * 1024)])
    legacy = single("refs/app", "legacy", [make_layer(102, 30 * 1024)])
    bare = single("refs/app", "bare", [make_layer(103, 20 * 1024)])
    signature = signature_image(image, key, oci11=True)
    sbom = sbom_image(image, b'{"spdxVersion": "SPDX-2.3", "name": "refs/app"}')
    legacy_sig = signature_image(legacy, key)
    pusher = Pusher(upstream.url, token_server.realm, token_server.service)
    for item in (image, legacy, bare, signature, sbom, legacy_sig):
        pusher.push(item)
    pusher.push(tag_schema_index(image, [signature, sbom]))
    return {
        "image": image,
        "legacy": legacy,
        "bare": bare,
        "signature": signature,
        "sbom": sbom,
        "legacy_sig": legacy_sig,
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory, redis_server, upstream, fake):
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("referrers"),
        redis_server.url,
        [
            {"name": "docker.io", "url": upstream.url, "referrers_ttl": REFERRERS_TTL},
            {"name": "api.test", "url": fake.url, "referrers_ttl": REFERRERS_TTL},
        ],
        upstream={"connect_timeout": 1, "read_timeout": 3},
    )
    yield server
    server.stop()


def referrers(cache, repository: str, digest: str, **params) -> requests.Response:
    return requests.get(
        f"{cache.url}/v2/{repository}/referrers/{digest}", params=params, timeout=30
    )


def test_referrers_from_an_upstream_without_the_api_come_from_the_tag_schema(
    cache, attached, upstream
):
    image, signature, sbom = attached["image"], attached["signature"], attached["sbom"]
    mark = upstream.mark()
    answer = referrers(cache, "refs/app", image.digest)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == OCI_INDEX
    index = answer.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    assert index["manifests"] == [referrer_descriptor(signature), referrer_descriptor(sbom)]
    assert "OCI-Filters-Applied" not in answer.headers
    # distribution 2.8 has no referrers API: the cache asked it, then read the tag schema.
    asked = [(r[0], r[1].split("/", 4)[-1], r[2]) for r in upstream.requests_since(mark)]
    assert ("GET", f"referrers/{image.digest}", 404) in asked
    assert ("GET", f"manifests/{image.digest.replace(':', '-')}", 200) in asked

    signatures = referrers(cache, "refs/app", image.digest, artifactType=SIG_ARTIFACT_TYPE)
    assert signatures.headers["OCI-Filters-Applied"] == "artifactType"
    assert signatures.json()["manifests"] == [referrer_descriptor(signature)]
    sboms = referrers(cache, "refs/app", image.digest, artifactType=SBOM_ARTIFACT_TYPE)
    assert sboms.json()["manifests"] == [referrer_descriptor(sbom)]
    none = referrers(cache, "refs/app", image.digest, artifactType="application/x-nothing")
    assert none.status_code == 200 and none.json()["manifests"] == []


def test_a_manifest_nothing_refers_to_gets_an_empty_index(cache, attached):
    answer = referrers(cache, "refs/app", attached["bare"].digest)
    assert answer.status_code == 200
    assert answer.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    missing = referrers(cache, "refs/app", "sha256:" + "0" * 64)
    assert missing.status_code == 200 and missing.json()["manifests"] == []


def test_an_invalid_digest_is_a_400(cache):
    answer = referrers(cache, "refs/app", "sha256:nothex")
    assert answer.status_code == 400
    assert answer.json()["errors"][0]["code"] == "DIGEST_INVALID"


def test_the_artifacts_pull_through_byte_exact(cache, attached, tmp_path):
    """skopeo copies the signature (by digest, and by cosign's legacy `.sig` tag) and the
    SBOM through the cache: the same manifest bytes, `subject` and `artifactType` intact."""
    policy = skopeo_policy(tmp_path)
    host = cache.url.removeprefix("http://")
    cases = [
        (attached["signature"], f"refs/app@{attached['signature'].digest}"),
        (attached["sbom"], f"refs/app@{attached['sbom'].digest}"),
        (attached["legacy_sig"], f"refs/app:{attached['legacy_sig'].tag}"),
    ]
    for number, (artifact, reference) in enumerate(cases):
        out = tmp_path / f"copy{number}"
        skopeo_copy(policy, f"{host}/{reference}", out)
        assert (out / "manifest.json").read_bytes() == artifact.manifest
        for digest, data in artifact.blobs.items():
            assert (out / digest.split(":")[1]).read_bytes() == data
    manifest = json.loads(attached["signature"].manifest)
    assert manifest["subject"]["digest"] == attached["image"].digest
    assert manifest["artifactType"] == SIG_ARTIFACT_TYPE


def _page(*descriptors: dict) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(descriptors)}
    ).encode()


def _artifact(n: int, artifact_type: str = SIG_ARTIFACT_TYPE) -> dict:
    return {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha256(f"artifact {n}".encode()),
        "size": 500 + n,
        "artifactType": artifact_type,
        "annotations": {"n": str(n)},
    }


def test_an_upstream_with_the_api_is_proxied_paginated_cached_revalidated_and_served_stale(
    cache, fake
):
    subject = sha256(b"an image on an upstream with the referrers API")
    path = f"/v2/team/app/referrers/{subject}"
    first, second, added = _artifact(1), _artifact(2, SBOM_ARTIFACT_TYPE), _artifact(3)
    headers = {"Content-Type": OCI_INDEX}
    fake.routes[path] = Route(
        body=_page(first),
        headers={**headers, "Link": f'<{path}?n=1&last=one>; rel="next"'},
    )
    fake.routes[f"{path}?n=1&last=one"] = Route(body=_page(second), headers=headers)
    before = fake.count("GET", "/referrers/")

    answer = referrers(cache, "api.test/team/app", subject)
    assert answer.status_code == 200 and answer.headers["X-Cache"] == "MISS"
    assert answer.json()["manifests"] == [first, second]
    assert fake.count("GET", "/referrers/") - before == 2  # both pages

    # Within referrers_ttl: from the cache, upstream not asked (any worker).
    for _ in range(4):
        again = referrers(cache, "api.test/team/app", subject)
        assert again.headers["X-Cache"] == "HIT"
        assert again.json()["manifests"] == [first, second]
    assert fake.count("GET", "/referrers/") - before == 2

    # A signature added upstream shows up once the TTL has passed.
    fake.routes[f"{path}?n=1&last=one"] = Route(body=_page(second, added), headers=headers)
    assert referrers(cache, "api.test/team/app", subject).json()["manifests"] == [first, second]
    time.sleep(REFERRERS_TTL + 0.5)
    fresh = referrers(cache, "api.test/team/app", subject)
    assert fresh.headers["X-Cache"] == "MISS"
    assert fresh.json()["manifests"] == [first, second, added]
    filtered = referrers(cache, "api.test/team/app", subject, artifactType=SIG_ARTIFACT_TYPE)
    assert filtered.json()["manifests"] == [first, added]

    # Upstream failing after the TTL: the last answer, marked stale.
    fake.routes[path] = Route(status=503, body=b"down")
    time.sleep(REFERRERS_TTL + 0.5)
    stale = referrers(cache, "api.test/team/app", subject)
    assert stale.status_code == 200
    assert stale.headers["X-Cache"] == "STALE"
    assert stale.headers["Warning"].startswith("110 ")
    assert stale.json()["manifests"] == [first, second, added]
    # Never cached, upstream failing: the failure, naming the upstream.
    failing = sha256(b"asked while failing")
    fake.routes[f"/v2/team/app/referrers/{failing}"] = Route(status=503, body=b"down")
    refused = referrers(cache, "api.test/team/app", failing)
    assert refused.status_code == 502
    assert "api.test" in refused.json()["errors"][0]["message"]


def test_concurrent_requests_for_a_list_make_one_upstream_request(cache, fake):
    subject = sha256(b"asked by many at once")
    path = f"/v2/team/app/referrers/{subject}"
    fake.routes[path] = Route(
        body=_page(_artifact(7)), headers={"Content-Type": OCI_INDEX}, delay=0.5
    )
    before = fake.count("GET", path)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: referrers(cache, "api.test/team/app", subject), range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    assert all(a.json()["manifests"] == [_artifact(7)] for a in answers)
    assert fake.count("GET", path) - before == 1
    assert sorted(a.headers["X-Cache"] for a in answers) == ["HIT"] * 7 + ["MISS"]


def test_a_next_page_on_another_host_is_refused(cache, fake):
    bystander_url = "http://127.0.0.2:9"
    subject = sha256(b"paged elsewhere")
    path = f"/v2/team/app/referrers/{subject}"
    fake.routes[path] = Route(
        body=_page(_artifact(9)),
        headers={"Content-Type": OCI_INDEX, "Link": f'<{bystander_url}{path}?p=2>; rel="next"'},
    )
    answer = referrers(cache, "api.test/team/app", subject)
    assert answer.status_code == 502
    assert "elsewhere" in answer.json()["errors"][0]["message"]


def test_a_referrers_list_is_bounded_in_bytes_and_descriptors_over_all_its_pages(cache, fake):
    """The amplification: 20 `Link` pages of about 3 MiB each were all read, parsed and
    stored. Now reading stops past limits.referrers_max_bytes (4 MiB) of all pages together,
    and past limits.referrers_max_descriptors (10,000), with a 502 that says so."""
    big = sha256(b"pages of megabytes")
    path = f"/v2/team/app/referrers/{big}"
    filler = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1}
    for n in range(20):
        padded = [
            {**filler, "digest": sha256(b"%d-%d" % (n, i)), "annotations": {"pad": "x" * 3000}}
            for i in range(350)
        ]  # about 1.1 MiB a page
        nxt = {"Link": f'<{path}?p={n + 1}>; rel="next"'} if n < 19 else {}
        fake.routes[path if n == 0 else f"{path}?p={n}"] = Route(
            body=_page(*padded), headers={"Content-Type": OCI_INDEX, **nxt}
        )
    before = fake.count("GET", path)
    answer = referrers(cache, "api.test/team/app", big)
    assert answer.status_code == 502
    assert "more than 4194304 bytes of referrers" in answer.json()["errors"][0]["message"]
    assert fake.count("GET", path) - before <= 4  # not the 20 pages

    many = sha256(b"ten thousand and more")
    path = f"/v2/team/app/referrers/{many}"
    for n in range(3):
        small = [{**filler, "digest": sha256(b"%d.%d" % (n, i))} for i in range(3400)]
        nxt = {"Link": f'<{path}?p={n + 1}>; rel="next"'} if n < 2 else {}
        fake.routes[path if n == 0 else f"{path}?p={n}"] = Route(
            body=_page(*small), headers={"Content-Type": OCI_INDEX, **nxt}
        )
    answer = referrers(cache, "api.test/team/app", many)
    assert answer.status_code == 502
    assert "more than 10000 referrers" in answer.json()["errors"][0]["message"]


def test_referrers_of_a_repository_upstream_does_not_have_write_nothing(cache, fake):
    made_up = sha256(b"nobody has this")
    answer = referrers(cache, "api.test/made/up", made_up)
    assert answer.status_code == 200 and answer.json()["manifests"] == []
    assert not (cache.data / "repositories" / "api.test" / "made").exists()


def test_concurrent_list_fetches_are_bounded_per_worker(tmp_path_factory, redis_server, fake):
    """limits.referrers_fetches lists asked of upstream at once per worker; the rest wait
    their turn (or get a 429 saying why)."""
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("fetches"), redis_server.url,
        [{"name": "api.test", "url": fake.url}], workers=1,
        limits={"referrers_fetches": 2}, default_registry="api.test",
    )  # fmt: skip
    try:
        subjects = [sha256(b"slow list %d" % n) for n in range(6)]
        for subject in subjects:
            fake.routes[f"/v2/team/app/referrers/{subject}"] = Route(
                body=_page(_artifact(5)), headers={"Content-Type": OCI_INDEX}, delay=0.6
            )
        fake.max_active = 0
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda s: referrers(server, "api.test/team/app", s), subjects))
        assert {a.status_code for a in answers} <= {200, 429}
        assert 200 in {a.status_code for a in answers}
        assert fake.max_active <= 2
    finally:
        server.stop()


def test_the_gc_keeps_referrers_with_their_image_and_drops_them_with_it(
    tmp_path, redis_server, redis_client, upstream, attached
):
    settings = make_settings(tmp_path / "data", redis_server.url, upstream.url)
    client = create_app(settings).test_client()
    image, legacy = attached["image"], attached["legacy"]
    for item in (image, legacy):
        assert client.get(f"/v2/{item.repository}/manifests/{item.tag}").status_code == 200
    # What cosign and oras fetch: the referrers list, the artifacts, the legacy .sig tag.
    assert client.get(f"/v2/refs/app/referrers/{image.digest}").status_code == 200
    # Each blob read to its end: its fill has committed it before the sweeps below.
    for artifact in (attached["signature"], attached["sbom"]):
        assert client.get(f"/v2/refs/app/manifests/{artifact.digest}").status_code == 200
        for digest, data in artifact.blobs.items():
            assert client.get(f"/v2/refs/app/blobs/{digest}").data == data
    sig_tag = attached["legacy_sig"].tag
    assert client.get(f"/v2/refs/app/manifests/{sig_tag}").status_code == 200
    for digest, data in attached["legacy_sig"].blobs.items():
        assert client.get(f"/v2/refs/app/blobs/{digest}").data == data

    store = ContentStore(FilesystemDriver(settings.storage_root))
    coord = Coordination(redis_client, settings.upstream.lease_ttl)
    repo = "docker.io/refs/app"
    tags_dir = settings.storage_root / "repositories" / repo / "_manifests" / "tags"
    hour = 3600.0
    artifacts = (attached["signature"], attached["sbom"], attached["legacy_sig"])

    def sweep(now: float) -> dict:
        policy = GcSettings(delay=hour, keep_pulled_within=2 * hour)
        return Collector(store, coord, policy, clock=lambda: now).run()

    def cached(artifact) -> bool:
        return store.read_blob(_d(artifact.digest)) == artifact.manifest and all(
            store.read_blob(_d(d)) == data for d, data in artifact.blobs.items()
        )

    # An hour and a half on (past gc.delay, within keep_pulled_within): both images stay,
    # and so does everything attached to them, although none of it is a root itself.
    now = time.time() + 1.5 * hour
    report = sweep(now)
    assert report["deleted_tags"] == 0 and report["deleted_blobs"] == 0
    assert sorted(p.name for p in tags_dir.iterdir()) == sorted(["1", "legacy", sig_tag])
    assert store.read_referrers_of(repo, _d(image.digest)) is not None
    assert all(cached(artifact) for artifact in artifacts)

    # Only `legacy` is pulled again; `1` ages out, and what is attached to it goes with it.
    coord.redis.zadd("pt:pulled", {f"{repo}:legacy": now + hour})
    report = sweep(now + 1.5 * hour)
    assert sorted(p.name for p in tags_dir.iterdir()) == sorted(["legacy", sig_tag])
    assert store.read_referrers_of(repo, _d(image.digest)) is None
    assert not any(cached(artifact) for artifact in artifacts[:2])
    assert cached(attached["legacy_sig"])
    assert report["deleted_tags"] == 1  # `1` (the .sig tag of `legacy` stays)


def _d(text: str) -> Digest:
    return Digest.parse(text)
