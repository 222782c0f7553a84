"""The access log answers "who pulled what": one line per request with the client, registry,
repository, reference, the digest served, ns, status, the bytes really sent (sendfile
included), the time and the cache result; the same fields as JSON with
PULLTHROUGH_LOG_FORMAT=json; a download cut short is logged with what left; a TLS handshake
on the plain port is told once per client per hour, with the fix only when no http request
followed. Checked in the log of a real gunicorn against what the client received."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from registry.mediatypes import MANIFEST_TYPES
from registry.serving import FALLBACK_WAIT
from tests.support.clients import tls_hello
from tests.support.images import Pusher, make_layer, single
from tests.support.servers import Gunicorn, RedisServer, ThrottledRelay

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}


@pytest.fixture(scope="module")
def slow_link(upstream):
    relay = ThrottledRelay(upstream.port, 32).start()
    yield relay
    relay.stop()


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    """A Redis of this module's own: what the log has said of 127.0.0.1 this hour is kept
    there (once per client per hour), and other modules' caches say things of it too."""
    server = RedisServer(tmp_path_factory.mktemp("accesslog-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, own_redis, upstream, slow_link):
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("accesslog"),
        own_redis.url,
        [{"name": "docker.io", "url": upstream.url}, {"name": "slow.test", "url": slow_link.url}],
        workers=2,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def json_cache(tmp_path_factory, redis_server, upstream):
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("accesslog-json"),
        redis_server.url,
        [{"name": "docker.io", "url": upstream.url}],
        workers=1,
        env={"PULLTHROUGH_LOG_FORMAT": "json"},
    )
    yield server
    server.stop()


def lines(cache, since: int) -> list[dict[str, str]]:
    """The text access lines written after byte `since` of the log, as field dicts."""
    out = []
    for line in cache.log()[since:].splitlines():
        if " registry.access request " not in line:
            continue
        body = line.split(" registry.access request ", 1)[1]
        fields = {}
        for key, value in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', body):
            fields[key] = json.loads(value) if value.startswith('"') else value
        out.append(fields)
    return out


def settle(cache, count: int, since: int) -> list[dict[str, str]]:
    """Wait for `count` lines: a blob's line is written after its last byte has gone."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = lines(cache, since)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    return lines(cache, since)


def test_a_pull_is_logged_with_who_what_and_how_much(cache, images):
    image = images["busybox"]
    base = f"{cache.url}/v2/{image.repository}"
    layer = max(image.blobs, key=lambda d: len(image.blobs[d]))
    mark = len(cache.log())
    manifest = requests.get(f"{base}/manifests/{image.tag}", headers=ACCEPT, timeout=30)
    requests.head(f"{base}/manifests/{image.tag}?ns=docker.io", headers=ACCEPT, timeout=30)
    miss = requests.get(f"{base}/blobs/{layer}", timeout=30)
    hit = requests.get(f"{base}/blobs/{layer}", timeout=30)  # sendfile from disk
    requests.get(f"{base}/manifests/nosuchtag", headers=ACCEPT, timeout=30)
    get, head, blob_miss, blob_hit, missing = settle(cache, 5, mark)

    assert get["client"] == "127.0.0.1" and get["method"] == "GET"
    assert (get["registry"], get["repository"], get["reference"]) == (
        "docker.io",
        image.repository,
        image.tag,
    )
    assert get["digest"] == image.digest and get["status"] == "200"
    assert int(get["bytes"]) == len(manifest.content) and get["cache"] in ("miss", "hit")
    assert float(get["ms"]) >= 0 and get["ns"] == "-" and get["path"] == "-"
    assert head["method"] == "HEAD" and head["ns"] == "docker.io" and head["bytes"] == "0"
    assert head["cache"] == "hit"
    assert (blob_miss["reference"], blob_miss["digest"]) == (layer, layer)
    assert blob_miss["cache"] == "miss" and int(blob_miss["bytes"]) == len(miss.content)
    assert blob_hit["cache"] == "hit" and int(blob_hit["bytes"]) == len(hit.content) > 0
    assert missing["status"] == "404" and missing["reference"] == "nosuchtag"
    assert missing["digest"] == "-"


def test_a_client_streaming_another_requests_fill_is_logged_as_joined(cache, images):
    image = images["big"]
    base = f"{cache.url}/v2/slow.test/{image.repository}"
    requests.get(f"{base}/manifests/{image.tag}", headers=ACCEPT, timeout=30).raise_for_status()
    layer = max(image.blobs, key=lambda d: len(image.blobs[d]))
    mark = len(cache.log())
    sizes: list[int] = []

    def fetch() -> None:
        sizes.append(len(requests.get(f"{base}/blobs/{layer}", timeout=60).content))

    first = threading.Thread(target=fetch)
    first.start()
    time.sleep(0.5)  # the fill is running: 48 MiB over a 32 MiB/s link
    fetch()
    first.join()
    logged = [f for f in settle(cache, 2, mark) if f["reference"] == layer]
    assert sorted(f["cache"] for f in logged) == ["joined", "miss"]
    assert sorted(int(f["bytes"]) for f in logged) == sorted(sizes)
    assert sizes == [len(image.blobs[layer])] * 2


def served_blob_bytes(cache) -> float:
    text = requests.get(f"{cache.url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "pullthrough_served_bytes_total" and sample.labels["kind"] == "blob"
    )


def read_and_leave(url: str, keep: int) -> int:
    """GET `url` on a socket with a small receive buffer, read `keep` bytes of the body and
    close: a client that gives up (curl ^C, a pull cancelled). Returns the body bytes read."""
    host, port = url.split("/")[2].split(":")
    path = "/" + url.split("/", 3)[3]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        body = len(data.split(b"\r\n\r\n", 1)[1])
        while body < keep:
            body += len(sock.recv(65536))
    return body


@pytest.mark.parametrize("cached", [True, False], ids=["hit-sendfile", "miss-stream"])
def test_an_aborted_download_is_logged_and_counted_with_the_bytes_that_left(
    cache, images, upstream, token_server, cached
):
    """A client that reads 2 MiB of a blob and goes: the log and /metrics count the bytes
    that left (what it read, and what the sockets' buffers held), not the blob's size."""
    image = images["big"]
    if not cached:  # a blob nothing has fetched yet, streamed over the slow link
        image = single("library/abort", "1", [make_layer(31, 24 << 20, "a.bin")], docker=True)
        Pusher(upstream.url, token_server.realm, token_server.service).push(image)
    prefix = "" if cached else "slow.test/"
    base = f"{cache.url}/v2/{prefix}{image.repository}"
    requests.get(f"{base}/manifests/{image.tag}", headers=ACCEPT, timeout=30).raise_for_status()
    layer = max(image.blobs, key=lambda d: len(image.blobs[d]))
    size = len(image.blobs[layer])
    if cached:
        assert len(requests.get(f"{base}/blobs/{layer}", timeout=60).content) == size
    before = served_blob_bytes(cache)
    mark = len(cache.log())
    received = read_and_leave(f"{base}/blobs/{layer}", 2 << 20)
    (line,) = [f for f in settle(cache, 1, mark) if f["reference"] == layer]
    assert line["cache"] == ("hit" if cached else "miss")
    logged = int(line["bytes"])
    # What left: what the client read, plus at most what the two sockets' buffers held.
    assert received <= logged < received + (12 << 20) < size, (received, logged, size)
    deadline = time.monotonic() + 5
    while served_blob_bytes(cache) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served_blob_bytes(cache) - before == logged


def test_client_controlled_text_cannot_forge_a_line(cache):
    mark = len(cache.log())
    requests.get(f"{cache.url}/ui/x%0Arequest%20client=6.6.6.6", timeout=10)
    (line,) = settle(cache, 1, mark)
    assert line["path"] == "/ui/x\nrequest client=6.6.6.6"
    assert "6.6.6.6" not in line["client"]


def test_json_lines_carry_the_same_fields(json_cache, images):
    image = images["busybox"]
    url = f"{json_cache.url}/v2/{image.repository}/manifests/{image.tag}?ns=docker.io"
    mark = len(json_cache.log())
    body = requests.get(url, headers=ACCEPT, timeout=30).content
    deadline = time.monotonic() + 10
    records: list[dict] = []
    while not records and time.monotonic() < deadline:
        records = [
            json.loads(line)
            for line in json_cache.log()[mark:].splitlines()
            if line.startswith("{") and '"event":"request"' in line
        ]
        time.sleep(0.05)
    (record,) = records
    assert record["client"] == "127.0.0.1" and record["method"] == "GET"
    assert record["registry"] == "docker.io" and record["repository"] == image.repository
    assert record["reference"] == image.tag and record["digest"] == image.digest
    assert record["ns"] == "docker.io" and record["status"] == 200
    assert record["bytes"] == len(body) and record["cache"] in ("hit", "miss")
    assert "time" in record and "pid" in record


def told(cache, since: int, text: str, count: int) -> list[str]:
    """The log's lines after byte `since` that hold `text`, once `count` of them are there
    (or the judgment's wait and a margin have passed)."""
    deadline = time.monotonic() + FALLBACK_WAIT + 5
    while True:
        found = [line for line in cache.log()[since:].splitlines() if text in line]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_a_tls_handshake_not_followed_by_http_is_logged_once_with_the_fix(cache):
    mark = len(cache.log())
    tls_hello(cache.port)
    tls_hello(cache.port)
    (line,) = told(cache, mark, "TLS handshake from 127.0.0.1", 1)
    assert " WARNING " in line and "insecure" in line
    assert "Invalid HTTP request line" not in cache.log()[mark:]
    time.sleep(1)  # the second handshake's judgment, made just after the first: not told
    assert len(told(cache, mark, "TLS handshake from 127.0.0.1", 0)) == 1
    # and the port still serves plain HTTP
    assert requests.get(f"{cache.url}/v2/", timeout=10).status_code == 200


def test_a_client_that_falls_back_to_http_is_told_once_and_not_as_a_problem(cache):
    """podman and skopeo with `insecure = true` try https first on every pull, then http:
    that is told once, as information, never as a change to make."""
    mark = len(cache.log())
    for _ in range(3):
        tls_hello(cache.port)
        assert requests.get(f"{cache.url}/v2/", timeout=10).status_code == 200
    (line,) = told(cache, mark, "came back over http", 1)
    assert " INFO " in line and "127.0.0.1" in line and "nothing to change" in line
    time.sleep(1)  # the later handshakes' judgments, made just after the first: not told
    assert len(told(cache, mark, "came back over http", 0)) == 1
    assert "TLS handshake from" not in cache.log()[mark:]
