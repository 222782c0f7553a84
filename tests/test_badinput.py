"""Bad input: fuzzed and hand-picked nasty requests get a 4xx with an OCI error body (never a
5xx), touch no file outside the storage root, reach no host that is not configured, and the
server keeps serving. Security headers on the UI."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.support.fakes import FakeRegistry
from tests.support.servers import ROOT, Gunicorn

# The distribution spec's codes, distribution's generic ones (TAG_INVALID, UNAVAILABLE), and
# NOT_FOUND, ours for a path that is no endpoint at all.
OCI_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
    "RANGE_INVALID",
    "PAGINATION_NUMBER_INVALID",
    "TAG_INVALID",
    "UNAVAILABLE",
    "NOT_FOUND",
}


class FileAudit:
    """Every file the process opens, creates, renames or deletes while `active` (a CPython
    audit hook: it sees what the code really did, whatever path it took to get there)."""

    EVENTS = {"open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.link"}

    def __init__(self) -> None:
        self.active = False
        self.paths: list[str] = []
        self._lock = threading.Lock()
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if not self.active or event not in self.EVENTS or not args:
            return
        for arg in args[:2] if event in ("os.rename", "os.replace", "os.link") else args[:1]:
            if isinstance(arg, str | bytes | Path):
                with self._lock:
                    self.paths.append(str(arg if not isinstance(arg, bytes) else arg.decode()))

    def __enter__(self) -> FileAudit:
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False

    def outside(self, *allowed: Path) -> list[str]:
        # Python's own files (lazy imports) and the project's templates are code, not data.
        # Resolved as the paths are (a virtualenv may be a symlink: CI's clones link one).
        roots = [
            str(Path(p).resolve())
            for p in (
                *allowed,
                sys.prefix,
                sys.base_prefix,
                ROOT / "registry",
                ROOT / ".hypothesis",
            )
        ]

        def resolved(path: str) -> str:
            try:
                return str(Path(path).resolve())
            except (ValueError, OSError):
                return path

        return [p for p in self.paths if not any(resolved(p).startswith(r + "/") for r in roots)]


AUDIT = FileAudit()


@pytest.fixture
def audited():
    """Wrap the requests in `with audited:`; only what the app does in there is recorded."""
    AUDIT.paths.clear()
    yield AUDIT
    AUDIT.active = False


def assert_oci_refusal(response, what: str) -> None:
    assert response.status_code < 500, (what, response.status_code, response.data[:300])
    if response.status_code >= 400 and response.request.method != "HEAD":
        errors = response.json["errors"]
        assert errors and errors[0]["code"] in OCI_CODES, (what, response.data[:300])


def test_the_file_audit_sees_what_the_app_touches(client, audited, settings, tmp_path):
    # The control for the tests below: a real pull is recorded, under the root; a file
    # opened elsewhere is reported.
    with audited:
        assert client.get("/v2/library/busybox/manifests/1.36").status_code == 200
    assert any(p.startswith(str(settings.storage_root)) for p in audited.paths)
    assert audited.outside(settings.storage_root) == []
    with audited:
        (tmp_path / "elsewhere").write_text("x")
    assert audited.outside(settings.storage_root) == [str(tmp_path / "elsewhere")]


NASTY_NAMES = [
    "../../etc",
    "library/../../../etc",
    "..%2f..%2fetc",
    "%2e%2e/%2e%2e/etc",
    "%252e%252e/etc",
    "/etc/passwd",
    "library//busybox",
    "library/busybox/",
    "library/busy\x00box",
    "library/%00",
    "LIBRARY/busybox",
    "library/" + "a" * 300,
    "/".join(["a"] * 200),
    "library/%ff%fe",
    "library/caf\u00e9",
    "library/busybox;rm -rf",
    "docker.io/../../../tmp",
    "127.0.0.1:1/library/busybox",
    "library/.hidden",
    "library/-dash",
    "_catalog/../library/busybox",
]
NASTY_REFERENCES = [
    "../../../../etc/passwd",
    "%2e%2e%2f%2e%2e%2fetc",
    "sha256:" + "A" * 64,
    "sha256:" + "a" * 63,
    "sha256:" + "g" * 64,
    "sha256:../../../../etc/passwd",
    "sha512:" + "a" * 64,
    "md5:" + "a" * 32,
    "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
    "sha256:",
    ":",
    "t" * 129,
    "-leading-dash",
    ".hidden",
    "tag\x00nul",
    "%ff%fe",
    "latest%00.json",
]


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_nasty_repository_names_are_refused_cleanly(client, audited, settings, name):
    for kind, ref in (("manifests", "latest"), ("blobs", "sha256:" + "a" * 64), ("tags", None)):
        path = f"/v2/{name}/{kind}/{ref}" if ref else f"/v2/{name}/tags/list"
        for method in ("GET", "HEAD"):
            with audited:
                response = client.open(path, method=method)
            assert_oci_refusal(response, path)
    assert audited.outside(settings.storage_root) == []


@pytest.mark.parametrize("reference", NASTY_REFERENCES)
def test_nasty_references_and_digests_are_refused_cleanly(client, audited, settings, reference):
    for kind in ("manifests", "blobs"):
        path = f"/v2/library/busybox/{kind}/{reference}"
        for method in ("GET", "HEAD"):
            with audited:
                response = client.open(path, method=method)
            assert_oci_refusal(response, path)
    assert audited.outside(settings.storage_root) == []


@pytest.mark.parametrize(
    "query",
    [
        "n=-1",
        "n=1e9",
        "n=99999999999999999999",
        "n=%00",
        "n=0x10",
        "last=" + "z" * 5000,
        "last=../../etc",
        "n=1&n=2&last=a&last=b",
        "&".join(f"p{i}=v" for i in range(3000)),
    ],
)
def test_nasty_pagination_is_refused_cleanly(client, query):
    for path in ("/v2/_catalog", "/v2/library/busybox/tags/list"):
        assert_oci_refusal(client.get(f"{path}?{query}"), f"{path}?{query[:40]}")


# A character set that reaches the interesting corners: separators, dots, encodings, case,
# control characters and non-ASCII.
_ALPHABET = st.sampled_from([*"abcAZ09._-/:%@+~ \x00\t\n\u00e9\u202e\ud7ff", "..", "%2e"])
_fuzz_text = st.lists(_ALPHABET, max_size=40).map("".join)
_digests = st.builds(
    lambda alg, hexpart: f"{alg}:{hexpart}",
    st.sampled_from(["sha256", "sha512", "SHA256", "md5", "sha256+b64", ""]),
    st.text("0123456789abcdefABCDEFg", min_size=0, max_size=130),
)


@hypothesis_settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    name=_fuzz_text,
    reference=st.one_of(_fuzz_text, _digests),
    kind=st.sampled_from(["manifests", "blobs", "tags", "catalog"]),
    method=st.sampled_from(["GET", "HEAD"]),
    n=st.one_of(st.none(), _fuzz_text, st.integers(-5, 10**12).map(str)),
    last=st.one_of(st.none(), _fuzz_text),
    ns=st.one_of(st.none(), _fuzz_text, st.sampled_from(["docker.io", "127.0.0.1:1", "evil.test"])),
    # A header value cannot hold a line break (the test client refuses to send one).
    byte_range=st.one_of(
        st.none(),
        _fuzz_text.map(lambda v: v.replace("\n", " ")),
        st.from_regex(r"bytes=-?\d{0,20}-?\d{0,20}", fullmatch=True),
    ),
)
def test_fuzzed_requests_never_fail_with_5xx_or_touch_files_outside_the_root(
    client, audited, settings, name, reference, kind, method, n, last, ns, byte_range
):
    quoted = quote(name, safe="/%")
    if kind == "catalog":
        path = "/v2/_catalog"
    elif kind == "tags":
        path = f"/v2/{quoted}/tags/list"
    else:
        path = f"/v2/{quoted}/{kind}/{quote(reference, safe=':%')}"
    query = {k: v for k, v in (("n", n), ("last", last), ("ns", ns)) if v is not None}
    headers = {"Range": byte_range} if byte_range is not None else {}
    with audited:
        response = client.open(path, method=method, query_string=query, headers=headers)
    assert_oci_refusal(response, f"{method} {path} {query} {headers}")
    assert audited.outside(settings.storage_root) == []


@pytest.fixture(scope="module")
def bystander():
    """A server that must never be contacted: where a request-chosen upstream would go."""
    server = FakeRegistry().start()
    yield server
    server.stop()


def test_no_request_chosen_upstream_ns_or_path_prefix(client, bystander):
    host = f"127.0.0.1:{bystander.port}"
    for path, query in (
        ("/v2/library/busybox/manifests/latest", {"ns": host}),
        (f"/v2/{host}/library/busybox/manifests/latest", {}),
        ("/v2/library/busybox/blobs/sha256:" + "a" * 64, {"ns": f"http://{host}"}),
        (f"/v2/{host}/library/busybox/tags/list", {}),
    ):
        response = client.get(path, query_string=query)
        assert 400 <= response.status_code < 500, (path, query, response.status_code)
    assert bystander.hits == []


def test_ui_pages_carry_security_headers(client):
    for path in ("/", "/ui/repositories?q=%3Cscript%3E", "/ui/setup"):
        response = client.get(path)
        assert response.status_code == 200, path
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp
        assert "frame-ancestors 'none'" in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"


# -- raw HTTP against real gunicorn: what a test client cannot even express -----------------
@pytest.fixture(scope="module")
def served(tmp_path_factory, redis_server, upstream):
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("badinput"),
        redis_server.url,
        [{"name": "docker.io", "url": upstream.url}],
        workers=2,
    )
    yield server
    server.stop()


def raw(port: int, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are; (status, body) of the answer, (0, b"") when the server hung up."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass  # refused before we finished sending (reset, not connected, broken pipe)
    if not data:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


RAW_CASES = {
    "invalid UTF-8 in the path": b"GET /v2/library/\xff\xfe/manifests/latest HTTP/1.1\r\n",
    "NUL in the path": b"GET /v2/library/busy\x00box/manifests/latest HTTP/1.1\r\n",
    "absolute-form target": b"GET http://evil.test/v2/library/busybox/manifests/latest"
    b" HTTP/1.1\r\n",
    "traversal, not normalised": b"GET /v2/../../etc/passwd HTTP/1.1\r\n",
    "encoded traversal": b"GET /v2/%2e%2e/%2e%2e/etc/manifests/passwd HTTP/1.1\r\n",
    "over-long request line": b"GET /v2/" + b"a/" * 5000 + b"manifests/x HTTP/1.1\r\n",
    "thousands of query parameters": b"GET /v2/_catalog?"
    + b"&".join(b"p%d=v" % i for i in range(5000))
    + b" HTTP/1.1\r\n",
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_raw_nasty_requests_get_4xx_and_the_server_keeps_serving(served, case):
    status, body = raw(served.port, RAW_CASES[case] + b"Host: x\r\nConnection: close\r\n\r\n")
    # gunicorn refuses what HTTP itself forbids (its own plain answer or a hang-up); whatever
    # reaches the app gets an OCI error.
    assert status == 0 or 400 <= status < 500, (case, status, body[:200])
    assert requests.get(f"{served.url}/v2/", timeout=10).status_code == 200


def test_huge_and_numerous_headers_are_refused_and_the_server_keeps_serving(served):
    huge = b"X-Big: " + b"a" * 200_000 + b"\r\n"
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(2000))
    for headers in (huge, many):
        request = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n"
        status, _ = raw(served.port, request)
        assert status == 0 or 400 <= status < 500, status
    assert requests.get(f"{served.url}/v2/", timeout=10).status_code == 200
