"""The signature policy (`verify:`): images signed as `cosign sign --key` signs them, pushed to
distribution with their `.sig` tags (and in OCI 1.1 mode through the referrers tag schema),
pulled through caches in enforce and warn mode. What a person reads is checked where they
read it: skopeo's error output, the status line, the UI page in the browser, /metrics."""

from __future__ import annotations

import json
import re
import time

import pytest
import requests
from playwright.sync_api import sync_playwright

from registry.cosign import REASONS, Verdict
from tests.support.clients import require, skopeo_copy, skopeo_policy
from tests.support.cosign import (
    SBOM_ARTIFACT_TYPE as SBOM,
)
from tests.support.cosign import (
    SIMPLE_SIGNING,
    Key,
    descriptor,
    payload_for,
    signature_image,
    tag_schema_index,
)
from tests.support.images import Image, Pusher, index, make_layer, single
from tests.support.servers import Gunicorn

ACCEPT = {
    "Accept": ", ".join(
        [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ]
    )
}


@pytest.fixture(scope="module")
def keys():
    return {"trusted": Key.generate(), "stranger": Key.generate()}


@pytest.fixture(scope="module")
def signed(upstream, token_server, keys):
    """Images in `sig/app` signed every way the policy must tell apart."""
    trusted, stranger = keys["trusted"], keys["stranger"]
    images = {
        name: single("sig/app", name, [make_layer(200 + n, 16 * 1024, f"{name}.bin")])
        for n, name in enumerate(
            ["signed", "oci11", "unsigned", "tampered", "foreign", "stranger", "later"]
        )
    }
    children = [
        single("sig/app", "", [make_layer(220 + n, 16 * 1024)], arch=arch)
        for n, arch in enumerate(["amd64", "arm64"])
    ]
    images["multi"] = index("sig/app", "multi", children)
    ref = "registry.test/sig/app"
    oci11 = signature_image(images["oci11"], trusted, oci11=True)
    original = payload_for(ref, images["tampered"].digest)
    artifacts = [
        signature_image(images["signed"], trusted),
        oci11,
        tag_schema_index(images["oci11"], [oci11]),
        # The payload edited after signing (the identity changed): the signature is over
        # the original bytes.
        signature_image(
            images["tampered"],
            trusted,
            payload=original.replace(b"registry.test", b"evil.test"),
            signed=original,
        ),
        # A good signature, but of another image, attached to this one.
        signature_image(
            images["foreign"], trusted, payload=payload_for(ref, images["signed"].digest)
        ),
        signature_image(images["stranger"], stranger),
        signature_image(images["multi"], trusted),
    ]
    pusher = Pusher(upstream.url, token_server.realm, token_server.service)
    for item in [*images.values(), *artifacts]:
        pusher.push(item)
    return images


def _config(keys: list[Key], mode: str, upstream_url: str, ttl: float = 300) -> list[dict]:
    return [
        {
            "name": "docker.io",
            "url": upstream_url,
            "referrers_ttl": ttl,
            "verify": [
                {
                    "repositories": "sig/*",
                    "cosign_keys": [k.public_pem for k in keys],
                    "mode": mode,
                }
            ],
        }
    ]


def _server(tmp_path_factory, redis_server, registries, name, **sections) -> Gunicorn:
    return Gunicorn.with_config(
        tmp_path_factory.mktemp(name), redis_server.url, registries, **sections
    )


@pytest.fixture(scope="module")
def enforcing(tmp_path_factory, redis_server, upstream, keys, signed):
    server = _server(
        tmp_path_factory, redis_server, _config([keys["trusted"]], "enforce", upstream.url), "enf"
    )
    yield server
    server.stop()


def get_manifest(cache, reference: str) -> requests.Response:
    return requests.get(f"{cache.url}/v2/sig/app/manifests/{reference}", headers=ACCEPT, timeout=30)


def checks(cache) -> dict[str, float]:
    """pullthrough_signature_checks_total by result, from /metrics."""
    text = requests.get(f"{cache.url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for result, value in re.findall(
        r'^pullthrough_signature_checks_total\{registry="docker.io",result="(\w+)"\} (\S+)$',
        text,
        flags=re.MULTILINE,
    ):
        out[result] = float(value)
    return out


def test_enforce_serves_signed_images_by_tag_and_digest(enforcing, signed, tmp_path):
    for name in ("signed", "oci11"):
        image = signed[name]
        by_tag = get_manifest(enforcing, name)
        assert by_tag.status_code == 200 and by_tag.content == image.manifest
        assert get_manifest(enforcing, image.digest).status_code == 200
    # An index that verifies covers its children, pulled by digest; skopeo copies it all.
    multi = signed["multi"]
    out = tmp_path / "multi"
    skopeo_copy(skopeo_policy(tmp_path), f"{enforcing.url[7:]}/sig/app:multi", out)
    for child in multi.children:
        assert get_manifest(enforcing, child.digest).status_code == 200
        for digest, data in child.blobs.items():
            assert (out / digest.split(":")[1]).read_bytes() == data
    # What cosign itself asks for is no image: served without a signature of its own.
    signature_tag = signed["signed"].digest.replace(":", "-") + ".sig"
    assert get_manifest(enforcing, signature_tag).status_code == 200


REFUSED = {
    "unsigned": Verdict.UNSIGNED,
    "tampered": Verdict.UNKNOWN_KEY,
    "foreign": Verdict.MISMATCH,
    "stranger": Verdict.UNKNOWN_KEY,
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_enforce_refuses_the_rest_with_the_cause_where_people_read_it(
    enforcing, signed, upstream, tmp_path, name
):
    image = signed[name]
    cause = REASONS[REFUSED[name]]
    mark = upstream.mark()
    refused = get_manifest(enforcing, name)
    assert refused.status_code == 403
    assert refused.reason.startswith(cause)  # the status line
    error = refused.json()["errors"][0]
    assert error["code"] == "DENIED"
    assert cause in error["message"] and image.digest in error["message"]
    # skopeo prints the body's message of a 4xx: the cause is in what it prints.
    copy = skopeo_copy(
        skopeo_policy(tmp_path), f"{enforcing.url[7:]}/sig/app:{name}", tmp_path / "out",
        check=False,
    )  # fmt: skip
    assert copy.returncode != 0
    assert cause in copy.stderr, copy.stderr
    # No blob of the refused image was asked of upstream (only the signature's payload).
    layers = [d for d in image.blobs]
    asked = [r for r in upstream.requests_since(mark) if "/blobs/" in r[1]]
    assert not [r for r in asked if any(layer in r[1] for layer in layers)]


def test_checks_are_counted_by_result(enforcing, signed):
    for name in ("signed", "oci11", "multi", *REFUSED):
        get_manifest(enforcing, name)
    counted = checks(enforcing)
    # One check per image (verdicts are shared, children are covered by their index).
    assert counted == {"signed": 3, "unsigned": 1, "mismatch": 1, "unknown_key": 2}


def test_the_repository_page_shows_each_tag_signed_unsigned_or_failed(enforcing, signed):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=require("chromium"), args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page()
        page.goto(f"{enforcing.url}/ui/repositories/sig/app")
        cells = {
            row.locator("td").first.inner_text(): row.locator("td.signature").inner_text()
            for row in page.locator("#tags tr").all()[1:]
        }
        browser.close()
    assert cells["signed"] == "signed"
    assert cells["multi"] == "signed"
    assert cells["unsigned"] == "unsigned"
    assert cells["foreign"] == "failed: signature does not match"
    assert cells["stranger"] == "failed: signed by an unknown key"
    assert cells[signed["signed"].digest.replace(":", "-") + ".sig"] == "—"


def test_warn_serves_everything_logs_and_marks_it(
    tmp_path_factory, redis_server, redis_client, upstream, keys, signed
):
    cache = _server(
        tmp_path_factory, redis_server, _config([keys["trusted"]], "warn", upstream.url), "warn"
    )
    try:
        for name in ("signed", *REFUSED):
            answer = get_manifest(cache, name)
            assert answer.status_code == 200 and answer.content == signed[name].manifest
        log = cache.log()
        for name, verdict in REFUSED.items():
            assert f"sig/app@{signed[name].digest} is {REASONS[verdict]}" in log
        assert checks(cache) == {"signed": 1, "unsigned": 1, "mismatch": 1, "unknown_key": 2}
    finally:
        cache.stop()


def test_a_change_of_keys_forgets_what_was_found(
    tmp_path_factory, redis_server, upstream, keys, signed, enforcing
):
    # With the trusted key (the module's cache): `signed` verified, `stranger` refused.
    assert get_manifest(enforcing, "signed").status_code == 200
    assert get_manifest(enforcing, "stranger").status_code == 403
    # The same Redis, only the stranger's key: what was found before no longer counts.
    cache = _server(
        tmp_path_factory, redis_server, _config([keys["stranger"]], "enforce", upstream.url),
        "rekeyed",
    )  # fmt: skip
    try:
        assert get_manifest(cache, "stranger").status_code == 200
        refused = get_manifest(cache, "signed")
        assert refused.status_code == 403
        assert refused.reason.startswith(REASONS[Verdict.UNKNOWN_KEY])
    finally:
        cache.stop()


def test_a_signature_pushed_later_is_seen_after_the_referrers_ttl(
    tmp_path_factory, redis_server, signed, keys, upstream, token_server
):
    """A refusal is kept only as long as referrers are (and upstream's "no such tag" as long
    as the negative cache keeps it): then the new signature is found."""
    image: Image = signed["later"]
    cache = _server(
        tmp_path_factory, redis_server,
        _config([keys["trusted"]], "enforce", upstream.url, ttl=1), "later",
        upstream={"negative_ttl": 1},
    )  # fmt: skip
    try:
        assert get_manifest(cache, "later").status_code == 403
        Pusher(upstream.url, token_server.realm, token_server.service).push(
            signature_image(image, keys["trusted"])
        )
        deadline = time.monotonic() + 20
        while get_manifest(cache, "later").status_code != 200:
            assert time.monotonic() < deadline, "the new signature was never seen"
            time.sleep(0.3)
    finally:
        cache.stop()


def _disguised(image: Image, tag: str, **fields) -> Image:
    """`image` (runnable: an image config, tar+gzip layers) with `fields` set in its manifest,
    or, with `layer_type`, its layers relabelled."""
    doc = json.loads(image.manifest)
    layer_type = fields.pop("layer_type", None)
    if layer_type:
        for layer in doc["layers"]:
            layer["mediaType"] = layer_type
    doc.update(fields)
    body = json.dumps(doc, separators=(",", ":")).encode()
    return Image(image.repository, tag, body, image.media_type, dict(image.blobs))


def test_an_unsigned_image_dressed_as_an_attachment_is_refused(
    enforcing, signed, upstream, token_server, tmp_path
):
    """Whoever can push to the upstream repository is who the policy is for: an ordinary
    runnable image is refused however it dresses up as a signature, attestation or referrer
    (artifactType, subject, an attachment's tag name, cosign's layer type over an image config,
    listed in a subject's referrers), while the real attachments stay served."""
    bait = single("sig/app", "bait", [make_layer(260, 16 * 1024, "bait.bin")])
    runnable = single("sig/app", "", [make_layer(261, 16 * 1024, "payload.bin")])
    attached = bait.digest.replace(":", "-")
    disguises = {
        "artifact-type": _disguised(
            runnable, "artifact-type", artifactType="application/vnd.example.thing"
        ),
        "subject": _disguised(
            runnable, "subject", subject=descriptor(signed["signed"]), artifactType=SBOM
        ),
        f"{attached}.att": _disguised(runnable, f"{attached}.att"),
        f"{attached}.sig": _disguised(runnable, f"{attached}.sig", layer_type=SIMPLE_SIGNING),
        "cosign-layers": _disguised(runnable, "cosign-layers", layer_type=SIMPLE_SIGNING),
    }
    # Listed in the bait's referrers (the tag schema on this distribution): reached by the
    # policy as a referrer, and still an image.
    referrer = _disguised(runnable, "referrer", subject=descriptor(bait), artifactType=SBOM)
    pusher = Pusher(upstream.url, token_server.realm, token_server.service)
    for item in [bait, *disguises.values(), referrer, tag_schema_index(bait, [referrer])]:
        pusher.push(item)

    for tag, image in disguises.items():
        refused = get_manifest(enforcing, tag)
        assert refused.status_code == 403, tag
        assert refused.reason.startswith(REASONS[Verdict.UNSIGNED]), (tag, refused.reason)
        assert get_manifest(enforcing, image.digest).status_code == 403, tag
    assert get_manifest(enforcing, referrer.digest).status_code == 403
    copy = skopeo_copy(
        skopeo_policy(tmp_path), f"{enforcing.url[7:]}/sig/app:artifact-type", tmp_path / "out",
        check=False,
    )  # fmt: skip
    assert copy.returncode != 0 and REASONS[Verdict.UNSIGNED] in copy.stderr, copy.stderr

    # What cosign and the referrers API really hold is served: the legacy signature, the
    # OCI 1.1 signature, and the tag schema index that lists it.
    oci11 = signed["oci11"].digest.replace(":", "-")
    for tag in (signed["signed"].digest.replace(":", "-") + ".sig", oci11):
        assert get_manifest(enforcing, tag).status_code == 200, tag
    listed = json.loads(get_manifest(enforcing, oci11).content)["manifests"]
    for entry in listed:
        assert get_manifest(enforcing, entry["digest"]).status_code == 200
