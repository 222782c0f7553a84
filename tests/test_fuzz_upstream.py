"""A fuzzer for what an upstream sends: a hostile registry (tests/support/hostile.py) whose
answers hypothesis draws (tag lists, digests, manifest fields, `Link`, `Retry-After`,
`WWW-Authenticate`, `Content-Type`, token bodies, bodies cut short or oversized), driven
against a cache with follow, referrers and an enforcing verify rule on, beside a real
docker.io (distribution) whose content it must not touch.

Invariants after every example: no 5xx that is not a named upstream failure; no file written
outside the storage root or outside the hostile registry's own repositories; docker.io's
files byte-identical; every stored blob matching its digest; nothing image-shaped served
under the enforce rule (the upstream holds no key); the process's memory bounded.

`make test` runs a seeded set (PULLTHROUGH_FUZZ_EXAMPLES, default 40); `make soak` more.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from registry import create_app
from registry.config import settings_from_mapping
from registry.cosign import attachment_layers
from registry.pullthrough.follower import Follower
from tests.support.cosign import SIMPLE_SIGNING, Key
from tests.support.hostile import Answer, HostileRegistry, digest_of

EXAMPLES = int(os.environ.get("PULLTHROUGH_FUZZ_EXAMPLES", "40"))
SEED = int(os.environ.get("PULLTHROUGH_FUZZ_SEED", "20261207"))
NAME = "evil.test"
SUBJECT = "sha256:" + "a" * 64
OVERSIZED = b"<oversized>"
MANIFEST_TYPES = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
]
OCI_INDEX = MANIFEST_TYPES[1]
HOSTILE_TEXT = [
    "1/../../../../../../docker.io/library/alpine/_manifests/tags/3.19",
    "../../../etc/passwd",
    "a/b",
    "..",
    "",
    "1*",
    "x" * 300,
    "\x00",
    "١٢٣",
    "Ünïcode",
    "sha256-" + "a" * 64 + ".sig",
    "sha256:../../x",
    "sha256:" + "A" * 64,
    "<script>",
]

texts = st.one_of(
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,12}", fullmatch=True),
    st.sampled_from(HOSTILE_TEXT),
    st.text(max_size=20),
)
digests = st.one_of(
    st.just("$digest"),
    st.builds(lambda b: digest_of(b), st.binary(min_size=1, max_size=8)),
    st.just(SUBJECT),
    st.sampled_from(HOSTILE_TEXT),
    st.builds(lambda b: "sha512:" + hashlib.sha512(b).hexdigest(), st.binary(max_size=4)),
)
sizes = st.one_of(
    st.integers(min_value=-3, max_value=4096),
    st.just(2**63),
    st.booleans(),
    st.just("12"),
    st.none(),
)
media_types = st.one_of(
    st.sampled_from(
        [
            *MANIFEST_TYPES,
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.config.v1+json",
            SIMPLE_SIGNING,
            "application/vnd.dsse.envelope.v1+json",
            "text/html",
        ]
    ),
    texts,
)


@st.composite
def descriptors(draw) -> dict:
    out = {"mediaType": draw(media_types), "digest": draw(digests), "size": draw(sizes)}
    if draw(st.booleans()):
        out["artifactType"] = draw(media_types)
    if draw(st.booleans()):
        out["platform"] = {"architecture": draw(texts), "os": draw(texts)}
    return out


@st.composite
def manifest_bodies(draw) -> bytes:
    shape = draw(
        st.sampled_from(["valid", "valid", "image", "index", "garbage", "oversized", "list"])
    )
    if shape == "valid":  # well-formed, so that the cache stores it (and files its tag)
        config, layer = draw(st.binary(min_size=1, max_size=8)), draw(st.binary(max_size=8))
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPES[0],
                "config": {
                    "mediaType": draw(media_types),
                    "digest": digest_of(config),
                    "size": len(config),
                },
                "layers": [
                    {"mediaType": draw(media_types), "digest": digest_of(layer), "size": len(layer)}
                ],
            }
        ).encode()
    if shape == "garbage":
        return draw(st.binary(max_size=64))
    if shape == "oversized":
        return OVERSIZED  # made 5 MiB when served (a short repr for hypothesis)
    if shape == "list":
        return json.dumps(draw(st.lists(texts, max_size=3))).encode()
    doc: dict = {
        "schemaVersion": draw(st.sampled_from([2, 1, "2"])),
        "mediaType": draw(media_types),
    }
    if shape == "index":
        doc["manifests"] = draw(st.lists(descriptors(), max_size=3))
    else:
        doc["config"] = draw(descriptors())
        doc["layers"] = draw(st.lists(descriptors(), max_size=3))
    if draw(st.booleans()):
        doc["artifactType"] = draw(media_types)
    if draw(st.booleans()):
        doc["subject"] = draw(descriptors())
    return json.dumps(doc).encode()


statuses = st.sampled_from([200, 200, 200, 301, 307, 400, 401, 403, 404, 429, 500, 503])
locations = st.sampled_from(
    [
        "http://127.0.0.1:{redis}/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.100.100.200/",
        "file:///etc/passwd",
        "/v2/other/repo/blobs/" + SUBJECT,
        "gopher://127.0.0.1/",
        "",
    ]
)


@st.composite
def answers(draw, body: st.SearchStrategy[bytes]) -> Answer:
    status = draw(statuses)
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["Content-Type"] = draw(media_types)
    if draw(st.booleans()):
        headers["Docker-Content-Digest"] = draw(digests)
    if status in (301, 307):
        headers["Location"] = draw(locations)
    if status in (429, 503) or draw(st.booleans()):
        headers["Retry-After"] = draw(
            st.one_of(
                st.integers(min_value=-5, max_value=10**12).map(str),
                st.sampled_from(["Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT"]),
                texts,
            )
        )
    if draw(st.booleans()):
        headers["Link"] = draw(
            st.sampled_from(
                [
                    f'</v2/x/y/referrers/{SUBJECT}?p=2>; rel="next"',
                    f'<http://127.0.0.2:9/v2/x/y/referrers/{SUBJECT}>; rel="next"',
                    '</v2/x/y/referrers/../../other/_manifests>; rel="next"',
                    '</v2/docker.io/library/alpine/tags/list?n=1>; rel="next"',
                    "garbage",
                ]
            )
        )
    content = draw(body)
    cut = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=max(0, len(content) - 1))))
    return Answer(status, content, headers, cut if content else None)


tag_lists = st.builds(
    lambda tags, extra: json.dumps({"name": "x/y", "tags": tags, **extra}).encode(),
    st.lists(st.one_of(texts, st.integers(), st.none()), max_size=6),
    st.sampled_from([{}, {"tags": None}, {"name": 5}]),
) | st.binary(max_size=32)
token_bodies = st.one_of(
    st.builds(
        lambda token, expires: json.dumps({"token": token, "expires_in": expires}).encode(),
        st.one_of(st.just("t"), st.integers(), st.none(), st.just("x" * 5000)),
        st.one_of(st.just(1e308), st.just("1e999"), st.integers(-5, 10**9), st.none(), texts),
    ),
    st.binary(max_size=32),
    st.just(b'{"token": "' + b"t" * (300 * 1024) + b'"}'),
)
challenges = st.one_of(
    st.none(),
    st.sampled_from(
        [
            'Bearer realm="{self}/token",service="evil"',
            'Bearer realm="http://127.0.0.1:{redis}/",service="evil"',
            'Bearer realm="file:///etc/passwd"',
            'Bearer realm="http://169.254.169.254/token"',
            'Basic realm="evil"',
            "Bearer",
            "garbage ,,, =",
        ]
    ),
)
scenarios = st.fixed_dictionaries(
    {
        "tags": answers(tag_lists),
        "manifest": answers(manifest_bodies()),
        "referrers": answers(manifest_bodies()),
        "blob": answers(st.binary(max_size=2048)),
        "token": answers(token_bodies),
        "challenge": challenges,
        "tag": texts,
    }
)


def _walk(root: str) -> dict[str, bytes]:
    out = {}
    for where, _, names in os.walk(root):
        for name in names:
            path = os.path.join(where, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = handle.read()
    return out


@pytest.fixture(scope="module")
def rig(tmp_path_factory, redis_server, upstream, images):
    """The cache (docker.io and the hostile evil.test), with alpine pulled from docker.io."""
    import redis as redis_lib

    # What earlier modules left (pulls the follower would follow) is not this rig's.
    redis_lib.Redis.from_url(redis_server.url).flushall()
    hostile = HostileRegistry().start()
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "store" / "data"
    key = Key.generate()
    raw = {
        "storage": {"root": str(root)},
        "redis": {"url": redis_server.url},
        "upstream": {"connect_timeout": 1, "read_timeout": 2, "metadata_timeout": 2},
        "registries": [
            {"name": "docker.io", "url": upstream.url},
            {
                "name": NAME,
                "url": hostile.url,
                "verify": [{"repositories": "signed/*", "cosign_keys": [key.public_pem]}],
                "referrers_ttl": 0,
                "tag_ttl": 0,
            },
        ],
        "follow": {"images": [{"image": f"{NAME}/x/y:*"}], "pulled_within": 3600},
        "limits": {"client_upstream_per_minute": 0},
    }
    cache_settings = settings_from_mapping(raw, env={})
    app = create_app(cache_settings)
    client = app.test_client()
    alpine = images["alpine"]
    pulled = client.get("/v2/library/alpine/manifests/3.19", headers={"Accept": alpine.media_type})
    assert pulled.status_code == 200
    for child in alpine.children:
        for digest in child.blobs:
            assert client.get(f"/v2/library/alpine/blobs/{digest}").status_code == 200
    # A fill commits (and links its repository) just after its client's last byte: the
    # snapshot is of the store once every one has.
    uploads = Path(root) / "uploads"
    deadline = time.monotonic() + 10
    while any(p.is_file() for p in uploads.rglob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    snapshot = {
        path: data
        for path, data in _walk(str(root)).items()
        if not path.startswith(f"repositories/{NAME}/")
    }
    yield app, client, hostile, base, root, snapshot, redis_server
    hostile.stop()


def _requests(client, tag: str) -> list:
    """What clients ask of the hostile registry through the cache, answers read whole."""
    accept = {"Accept": ", ".join(MANIFEST_TYPES)}
    asked = [
        ("GET", f"/v2/{NAME}/x/y/manifests/{tag}", accept),
        ("HEAD", f"/v2/{NAME}/x/y/manifests/1", accept),
        ("GET", f"/v2/{NAME}/x/y/manifests/{SUBJECT}", accept),
        ("GET", f"/v2/{NAME}/signed/app/manifests/1", accept),
        ("GET", f"/v2/{NAME}/signed/app/manifests/sha256-{'a' * 64}.sig", accept),
        ("GET", f"/v2/{NAME}/x/y/referrers/{SUBJECT}", {}),
        ("GET", f"/v2/{NAME}/x/y/tags/list?n=5", {}),
        ("GET", f"/v2/{NAME}/x/y/blobs/{SUBJECT}", {}),
    ]
    out = []
    for method, path, headers in asked:
        response = client.open(path, method=method, headers=headers)
        try:
            body = response.get_data()
        except Exception as exc:  # a blob stream cut when upstream's bytes failed to verify
            body = exc
        out.append((method, path, response, body))
    return out


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=list(HealthCheck),
    database=None,
)
@seed(SEED)
@given(scenario=scenarios)
def test_a_hostile_upstream_breaks_none_of_the_invariants(rig, scenario):
    app, client, hostile, base, _root, snapshot, redis_server = rig
    redis_port = redis_server.url.rsplit(":", 1)[1].split("/")[0]
    for kind in ("tags", "manifest", "referrers", "blob", "token"):
        answer = scenario[kind]
        location = answer.headers.get("Location")
        if location is not None:
            answer.headers["Location"] = location.replace("{redis}", redis_port)
        if answer.body == OVERSIZED:
            answer = replace(answer, body=b'{"layers": [' + b" " * (5 << 20) + b"]}")
        hostile.answers[kind] = answer
    challenge = scenario["challenge"]
    hostile.challenge = (
        challenge.replace("{self}", hostile.url).replace("{redis}", redis_port)
        if challenge
        else None
    )
    pt = app.extensions["pullthrough"]
    for pattern in ("pt:upstream:*", "pt:missing:*", "pt:follow:*"):
        for key in pt.coord.redis.scan_iter(pattern):
            pt.coord.redis.delete(key)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    answered = _requests(client, scenario["tag"])
    follow = replace(pt.settings.follow, interval=60.0)
    Follower(pt, pt.coord.follows, follow).tick(force=True)

    for method, path, response, body in answered:
        status = response.status_code
        if status >= 500:
            error = json.loads(body)["errors"][0] if method == "GET" else None
            reason = response.status.split(" ", 1)[1]
            assert NAME in reason, (method, path, response.status)
            if error is not None:
                assert error["code"] == "UNAVAILABLE" and NAME in error["message"], error
        if "/signed/" in path and "/manifests/" in path and status == 200 and method == "GET":
            assert attachment_layers(body) is not None, body[:300]
        if "/blobs/" in path and status == 200 and isinstance(body, bytes):
            assert digest_of(body) == SUBJECT
    # Nothing outside the storage root, nothing outside evil.test's repositories changed.
    files = _walk(str(base))
    outside = [p for p in files if not p.startswith("store/data/")]
    assert not outside, outside
    stored = {p[len("store/data/") :]: data for p, data in files.items()}
    for path, data in snapshot.items():
        if path.startswith(("uploads/", "tmp/")):
            continue
        if "/_manifests/tags/" in path:  # the follower revalidates docker.io's pulled tag
            assert json.loads(stored[path])["digest"] == json.loads(data)["digest"], path
        else:
            assert stored.get(path) == data, path
    for path, data in stored.items():
        if path.startswith("repositories/"):
            assert path.startswith(f"repositories/{NAME}/") or path in snapshot, path
        if path.startswith("blobs/"):
            algorithm, hexpart = path.split("/")[1], path.split("/")[3]
            assert hashlib.new(algorithm, data).hexdigest() == hexpart, path
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown < 256 * 1024, f"the process grew by {grown} KiB"
