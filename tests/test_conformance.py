"""The OCI distribution spec's pull workflow and error codes, rule by rule.

Each test quotes the rule it checks (distribution-spec v1.1, "Pull" and "Error Codes"), and
covers what the conformance suite's pull workflow asks: HEAD and GET of manifests by tag and
by digest, of blobs, and of what does not exist. The upstream is the real distribution.
"""

from __future__ import annotations

import re

import pytest

METHODS = ["GET", "HEAD"]


def _upstream_manifest_requests(upstream, mark):
    return [r for r in upstream.requests_since(mark) if "/manifests/" in r[1]]


@pytest.mark.parametrize("method", METHODS)
def test_a_manifest_that_is_not_found_is_404(client, method):
    """'If the manifest is not found in the registry, the response code MUST be
    404 Not Found.' (Pulling manifests; the conformance suite's "nonexistent manifest")"""
    response = client.open("/v2/library/busybox/manifests/nosuchtag", method=method)
    assert response.status_code == 404
    if method == "GET":
        assert response.json["errors"][0]["code"] == "MANIFEST_UNKNOWN"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reference", [".INVALID_MANIFEST_NAME", "sha256:nothex", "-x", "a" * 129])
def test_a_reference_that_is_neither_tag_nor_digest_is_404_without_asking_upstream(
    client, upstream, method, reference
):
    """'The <reference> MUST NOT be in any other format' than a digest or a tag matching
    [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}: such a reference names no manifest, so it is the 404
    of a manifest not found (TAG_INVALID belongs to pushes), and no upstream is asked."""
    mark = upstream.mark()
    response = client.open(f"/v2/library/busybox/manifests/{reference}", method=method)
    assert response.status_code == 404
    if method == "GET":
        assert response.json["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    else:
        assert response.data == b""
    assert _upstream_manifest_requests(upstream, mark) == []


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("by", ["tag", "digest"])
def test_an_existing_manifest_is_200_with_its_digest_type_and_length(client, images, method, by):
    """'A GET request to an existing manifest URL MUST provide the expected manifest, with a
    response code that MUST be 200 OK'; 'The Content-Type header SHOULD match what the client
    pushed'; a HEAD 'MUST return 200 OK', its digest 'SHOULD' be in Docker-Content-Digest and
    its size in Content-Length, and it carries no body."""
    image = images["busybox"]
    reference = image.tag if by == "tag" else image.digest
    response = client.open(f"/v2/{image.repository}/manifests/{reference}", method=method)
    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == image.digest
    assert response.headers["Content-Type"] == image.media_type
    assert response.headers["Content-Length"] == str(len(image.manifest))
    assert response.data == (image.manifest if method == "GET" else b"")


@pytest.mark.parametrize("method", METHODS)
def test_an_existing_blob_is_200_with_its_digest_and_length(client, images, method):
    """'A GET request to an existing blob URL MUST provide the expected blob, with a response
    code that MUST be 200 OK'; 'A successful response SHOULD contain the digest of the
    uploaded blob in the header Docker-Content-Digest'; a HEAD carries Content-Length."""
    image = images["busybox"]
    digest, data = next(iter(image.blobs.items()))
    client.get(f"/v2/{image.repository}/manifests/{image.tag}")
    response = client.open(f"/v2/{image.repository}/blobs/{digest}", method=method)
    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert response.headers["Content-Length"] == str(len(data))
    assert response.data == (data if method == "GET" else b"")


@pytest.mark.parametrize("method", METHODS)
def test_a_blob_that_is_not_found_is_404(client, method):
    """'If the blob is not found in the registry, the response code MUST be 404 Not Found.'"""
    response = client.open("/v2/library/busybox/blobs/sha256:" + "0" * 64, method=method)
    assert response.status_code == 404
    if method == "GET":
        assert response.json["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_a_range_of_a_blob_is_206_with_its_content_range(client, images):
    """'A registry SHOULD support the Range request header in accordance with RFC 9110.'"""
    image = images["busybox"]
    digest, data = next(iter(image.blobs.items()))
    client.get(f"/v2/{image.repository}/manifests/{image.tag}")
    response = client.get(
        f"/v2/{image.repository}/blobs/{digest}", headers={"Range": "bytes=10-19"}
    )
    assert response.status_code == 206
    assert response.data == data[10:20]
    assert response.headers["Content-Range"] == f"bytes 10-19/{len(data)}"


def test_the_api_root_answers_200(client):
    """end-1: 'GET /v2/' answers 200 on a registry that implements the specification."""
    assert client.get("/v2/").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v2/library/busybox/manifests/nosuchtag",
        "/v2/library/busybox/manifests/.INVALID_MANIFEST_NAME",
        "/v2/library/busybox/blobs/sha256:" + "0" * 64,
        "/v2/library/busybox/blobs/sha256:nothex",
        "/v2/library/nothere/tags/list",
        "/v2/Upper/manifests/x",
        "/v2/library/busybox/tags/list?n=x",
    ],
)
def test_error_bodies_follow_the_error_code_rules(client, path):
    """'The code field MUST be a unique identifier, containing only uppercase alphabetic
    characters and underscores. The message field is OPTIONAL, and if present, it SHOULD be a
    human readable string or MAY be empty. The detail field is OPTIONAL and MAY contain
    arbitrary JSON data'; the body is {"errors": [...]} and its type JSON."""
    response = client.get(path)
    assert 400 <= response.status_code < 500
    assert response.mimetype == "application/json"
    errors = response.json["errors"]
    assert isinstance(errors, list) and errors
    for error in errors:
        assert re.fullmatch(r"[A-Z_]+", error["code"])
        assert isinstance(error["message"], str) and error["message"]


def test_tags_are_listed_with_name_and_tags(client, images):
    """'GET /v2/<name>/tags/list': 'the response will be 200 OK' with a body of the form
    {"name": "<name>", "tags": [...]}, the tags 'in lexical order'."""
    response = client.get("/v2/library/busybox/tags/list")
    assert response.status_code == 200
    assert response.json["name"] == "library/busybox"
    assert response.json["tags"] == sorted(response.json["tags"])
    assert images["busybox"].tag in response.json["tags"]
