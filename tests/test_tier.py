"""The local tier of S3 nodes (storage.s3.local_cache, store/tier.py, pullthrough/tiering.py):
two gunicorn nodes on one Swift bucket and one Redis, each with its own tier directory. What
the bucket served is counted from Swift's own access log."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import random
import re
import signal
import time
import uuid

import pytest
import requests
import yaml
from playwright.sync_api import sync_playwright

from registry import build_pullthrough
from registry.config import settings_from_mapping
from registry.digests import Digest
from registry.errors import CacheUnavailable
from registry.gc import Collector
from registry.pullthrough.tiering import TierServing
from registry.store import ContentStore
from registry.store.filesystem import FilesystemDriver
from registry.store.tier import LocalTier
from tests.conftest import s3_section
from tests.support.clients import fetch
from tests.support.fakes import Route
from tests.support.images import Pusher, make_layer, single
from tests.support.servers import Gunicorn, ThrottledRelay, require, run_module

MIB = 1 << 20


@pytest.fixture(scope="module")
def prefix():
    return f"tier/{uuid.uuid4().hex}"


def start_node(
    workdir,
    redis_server,
    swift,
    fake,
    prefix,
    max_size="200MiB",
    low_watermark=0.5,
    env=None,
    **s3,
) -> Gunicorn:
    node = Gunicorn.with_config(
        workdir,
        redis_server.url,
        [{"name": "docker.io", "url": fake.url}],
        workers=2,
        env=env,
        storage=s3_section(
            swift,
            prefix,
            local_cache={
                "path": str(workdir / "tier"),
                "max_size": max_size,
                "low_watermark": low_watermark,
            },
            **s3,
        ),
        upstream={"lease_ttl": 2},
    )
    node.tier = workdir / "tier"
    return node


@pytest.fixture(scope="module")
def writer(tmp_path_factory, redis_server, swift, fake, prefix):
    """A node of the same bucket without a tier: it fills the bucket for the tests."""
    node = Gunicorn.with_config(
        tmp_path_factory.mktemp("tier-writer"),
        redis_server.url,
        [{"name": "docker.io", "url": fake.url}],
        workers=1,
        storage=s3_section(swift, prefix),
    )
    yield node
    node.stop()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, redis_server, swift, fake, prefix):
    a = start_node(tmp_path_factory.mktemp("tier-a"), redis_server, swift, fake, prefix)
    b = start_node(tmp_path_factory.mktemp("tier-b"), redis_server, swift, fake, prefix)
    yield a, b
    a.stop()
    b.stop()


def blob_key(digest: str) -> str:
    hexpart = digest.split(":")[1]
    return f"blobs/sha256/{hexpart[:2]}/{hexpart}"


def local_copy(node, digest: str):
    hexpart = digest.split(":")[1]
    return node.tier / "blobs" / "sha256" / hexpart[:2] / hexpart


def in_bucket(node, fake, name: str, size: int) -> tuple[bytes, str]:
    """A blob pulled once through `node`: in the bucket, in no tier yet."""
    data = random.randbytes(size)
    digest = fake.add_blob(f"library/{name}", data)
    status, body, complete = fetch(f"{node.url}/v2/library/{name}/blobs/{digest}")
    assert status == 200 and complete and body == data
    return data, digest


def in_the_bucket(swift, prefix: str, digest: str) -> bool:
    from tests.conftest import SWIFT_BUCKET

    listed = swift.client().list_objects_v2(
        Bucket=SWIFT_BUCKET, Prefix=f"{prefix}/{blob_key(digest)}"
    )
    return listed.get("KeyCount", 0) > 0


def metric(node, name: str) -> float:
    text = requests.get(f"{node.url}/metrics", timeout=10).text
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, flags=re.MULTILINE)
    assert match, name
    return float(match.group(1))


def reads_metric(node) -> float:
    text = requests.get(f"{node.url}/metrics", timeout=10).text
    match = re.search(
        r'^pullthrough_s3_blob_reads_total\{for="local_tier"\} (\S+)$', text, flags=re.MULTILINE
    )
    return float(match.group(1)) if match else 0.0


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_herd_on_two_nodes_reads_the_bucket_once_per_node_then_local_copies_serve(
    nodes, writer, fake, swift
):
    a, b = nodes
    data, digest = in_bucket(writer, fake, "tierherd", 24 * MIB)
    read_before = swift.object_gets(blob_key(digest))
    hits_before = metric(a, "pullthrough_local_tier_hits_total")
    copies_before = [reads_metric(node) for node in (a, b)]

    def one(node):
        status, body, complete = fetch(f"{node.url}/v2/library/tierherd/blobs/{digest}")
        return status, complete, hashlib.sha256(body).hexdigest()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, [a, b] * 8))
    assert set(results) == {(200, True, digest.split(":")[1])}
    wait_for(lambda: local_copy(a, digest).exists() and local_copy(b, digest).exists())
    assert local_copy(a, digest).read_bytes() == data == local_copy(b, digest).read_bytes()
    time.sleep(0.5)  # Swift logs a request when it ends
    assert swift.object_gets(blob_key(digest)) - read_before == 2  # one per node
    # What each node counted: one read of the bucket each (the figure of that truth).
    assert [reads_metric(n) - c for n, c in zip((a, b), copies_before, strict=True)] == [1, 1]

    # From now on the nodes serve their own copies: the bucket is not read again.
    for node in (a, b, a, b):
        status, body, complete = fetch(f"{node.url}/v2/library/tierherd/blobs/{digest}")
        assert status == 200 and complete and body == data
    ranged = requests.get(
        f"{b.url}/v2/library/tierherd/blobs/{digest}",
        headers={"Range": "bytes=1000-1999"},
        timeout=10,
    )
    assert ranged.status_code == 206 and ranged.content == data[1000:2000]
    time.sleep(0.5)
    assert swift.object_gets(blob_key(digest)) - read_before == 2
    assert metric(a, "pullthrough_local_tier_hits_total") - hits_before >= 2
    on_disk = sum(p.stat().st_size for p in (a.tier / "blobs").rglob("*") if p.is_file())
    assert metric(a, "pullthrough_local_tier_bytes") == on_disk >= len(data)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=require("chromium"), args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page()
        page.goto(f"{a.url}/")
        card = page.locator("#tier").inner_text()
        browser.close()
    count = sum(1 for p in (a.tier / "blobs").rglob("*") if p.is_file())
    assert f"{on_disk / MIB:.1f} MiB" in card and f"{count} verified copies" in card, card


def test_a_cold_herd_over_two_nodes_reads_each_stored_piece_once_per_node(nodes, fake, swift):
    a, b = nodes
    data = random.randbytes(24 * MIB)  # five pieces of 5 MiB, the last shorter
    digest = fake.add_blob("library/tiercold", data, trickle=0.01)  # a fill of about 4 s
    hexpart = digest.split(":")[1]

    def one(node):
        status, body, complete = fetch(f"{node.url}/v2/library/tiercold/blobs/{digest}")
        return status, complete, hashlib.sha256(body).hexdigest()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, [a, b] * 8))
    assert set(results) == {(200, True, hexpart)}
    wait_for(lambda: local_copy(a, digest).exists() and local_copy(b, digest).exists())
    assert local_copy(a, digest).read_bytes() == data == local_copy(b, digest).read_bytes()
    time.sleep(1)  # Swift logs a request when it ends
    pieces = range(0, len(data), 5 * MIB)
    reads = {o: swift.object_gets(f"uploads/sha256/{hexpart}/{o:016d}") for o in pieces}
    # The fetching node's copy is written by its fill and reads nothing; the other node
    # followed the fill once (into its tier), not once per client: each piece read once.
    assert reads == dict.fromkeys(pieces, 1), reads
    # The follower learned of each piece from the fill record: its GET, and no HEAD first.
    heads = {o: swift.object_heads(f"uploads/sha256/{hexpart}/{o:016d}") for o in pieces}
    assert heads == dict.fromkeys(pieces, 0), heads
    # Its last bytes came from the last piece, stored before the fill's bytes were verified,
    # not from the bucket's commit of the blob; and it did not look for the blob first (the
    # fill's record said it was not committed: a GET then could only say 404).
    assert swift.object_requests("GET", blob_key(digest)) == 0


def test_a_cold_pull_on_a_tier_node_is_copied_by_its_fill_reading_nothing_from_the_bucket(
    nodes, fake, swift
):
    a, _b = nodes
    data = random.randbytes(12 * MIB)
    digest = fake.add_blob("library/tierfill", data, trickle=0.005)
    hexpart = digest.split(":")[1]
    copied = metric(a, "pullthrough_local_tier_copied_bytes_total")
    url = f"{a.url}/v2/library/tierfill/blobs/{digest}"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        whole = pool.submit(fetch, url)
        # A range of the copy while it grows (sent from its file as it comes, with sendfile).
        part = pool.submit(
            requests.get, url, headers={"Range": "bytes=3000000-9999999"}, timeout=30
        )
        status, body, complete = whole.result()
        ranged = part.result()
    assert status == 200 and complete and body == data
    assert ranged.status_code == 206 and ranged.content == data[3000000:10000000]
    # The client's last byte waited for the node's verified copy, not for the bucket's.
    assert local_copy(a, digest).read_bytes() == data
    log = a.log_path.read_text()
    assert f"local tier copied {digest} bytes={len(data)}" in log
    assert "(written by its fill)" in log.split(f"local tier copied {digest}")[1].splitlines()[0]
    wait_for(lambda: f"fill committed digest={digest}" in a.log_path.read_text())
    time.sleep(1)  # Swift logs a request when it ends
    pieces = range(0, len(data), 5 * MIB)
    reads = [swift.object_gets(f"uploads/sha256/{hexpart}/{o:016d}") for o in pieces]
    assert reads == [0, 0, 0] and swift.object_gets(blob_key(digest)) == 0
    assert metric(a, "pullthrough_local_tier_copied_bytes_total") - copied == len(data)


def test_where_sendfile_is_off_a_growing_copy_is_read_and_sent_and_logged_whole(
    tmp_path, redis_server, swift, fake, prefix
):
    # gunicorn sends a tier client's FileSpans with sendfile; with sendfile off (as under
    # TLS) the body reads them itself. Four clients of one cold fill, one with a Range.
    node = start_node(
        tmp_path / "nosendfile",
        redis_server,
        swift,
        fake,
        prefix,
        env={"GUNICORN_CMD_ARGS": "--no-sendfile"},
    )
    try:
        data = random.randbytes(6 * MIB)
        digest = fake.add_blob("library/tiernosendfile", data, trickle=0.01)
        url = f"{node.url}/v2/library/tiernosendfile/blobs/{digest}"
        mark = len(node.log())
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            whole = [pool.submit(fetch, url) for _ in range(3)]
            part = pool.submit(fetch, url, headers={"Range": f"bytes={MIB}-{3 * MIB - 1}"})
            results = [f.result() for f in whole]
            status, body, complete = part.result()
        assert all(r == (200, data, True) for r in results)
        assert (status, body, complete) == (206, data[MIB : 3 * MIB], True)
        # Each response is logged with the bytes that went, once its last byte has gone.
        sent: list[int] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(sent) < 4:
            sent = [
                int(line.split(" bytes=", 1)[1].split()[0])
                for line in node.log()[mark:].splitlines()
                if " registry.access request " in line and digest in line
            ]
            time.sleep(0.05)
        assert sorted(sent) == [2 * MIB] + [len(data)] * 3
    finally:
        node.stop()


def test_a_herd_waiting_for_upstreams_first_answer_does_not_poll_the_bucket(nodes, fake, swift):
    a, b = nodes
    data = random.randbytes(2 * MIB)
    digest = fake.add_blob("library/tierwait", data, delay=2.0)  # upstream answers in 2 s
    heads = swift.object_heads(blob_key(digest))

    def one(node):
        return fetch(f"{node.url}/v2/library/tierwait/blobs/{digest}")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, [a, b] * 8))
    # What each client got, where it is not the blob: status, whole, length, the error body.
    wrong = [(s, c, len(b), b[:300]) for s, b, c in results if (s, b, c) != (200, data, True)]
    assert not wrong, wrong
    time.sleep(1)  # Swift logs a request when it ends
    # One look per worker process (2 per node): requests that came while it was out waited
    # for its answer, those that came in the next MISS_HOLD took it as theirs (however long
    # the fill took to take its lease), later ones joined the fill its record shows; and a
    # few of the fetcher's. Not one per request, nor one per poll while upstream is silent.
    assert swift.object_heads(blob_key(digest)) - heads <= 2 * 2 + 4
    # Smaller than a piece: stored in one PUT at the commit, no piece first.
    hexpart = digest.split(":")[1]
    pieces = [line for line in swift.access if f"/uploads/sha256/{hexpart}/" in line]
    assert not [line for line in pieces if " PUT " in line]


def test_a_fill_that_fails_on_its_digest_ends_its_tier_clients_and_leaves_no_copy(nodes, fake):
    a, _b = nodes
    good = random.randbytes(3 * MIB)
    digest = "sha256:" + hashlib.sha256(good).hexdigest()
    poisoned = bytearray(good)
    poisoned[2 * MIB] ^= 0xFF
    fake.routes[f"/v2/library/tierpoison/blobs/{digest}"] = Route(body=bytes(poisoned))
    status, body, complete = fetch(f"{a.url}/v2/library/tierpoison/blobs/{digest}")
    # An error, or a 200 cut short: never the whole body (its last byte waits for the copy).
    assert status != 200 or not complete
    assert len(body) < len(good)
    hexpart = digest.split(":")[1]
    wait_for(lambda: not (a.tier / "partial" / "sha256" / hexpart).exists())
    assert not local_copy(a, digest).exists()


def test_a_blob_the_gc_deletes_is_dropped_from_every_nodes_tier_at_once(
    nodes, writer, fake, swift, redis_server, prefix
):
    a, b = nodes
    data, digest = in_bucket(writer, fake, "tiergc", 3 * MIB)
    for node in (a, b):
        status, body, _complete = fetch(f"{node.url}/v2/library/tiergc/blobs/{digest}")
        assert status == 200 and body == data
    wait_for(lambda: local_copy(a, digest).exists() and local_copy(b, digest).exists())

    report = sweep(swift, prefix, redis_server, fake)  # the blob is an orphan
    assert report["deleted_blobs"] >= 1
    # Neither node served anything since: the sweep's message removed both copies.
    wait_for(lambda: not local_copy(a, digest).exists() and not local_copy(b, digest).exists(), 5)
    response = requests.get(f"{b.url}/v2/library/tiergc/blobs/{digest}", timeout=10)
    assert response.status_code == 200 and response.content == data  # fetched again


def sweep(swift, prefix, redis_server, fake, *, tell_tiers: bool = True) -> dict:
    """A GC sweep of the bucket from this process (its own process in production), with
    delay 0; `tell_tiers=False`: its message to the nodes' tiers is lost on the way."""
    config = {
        "storage": s3_section(swift, prefix),
        "redis": {"url": redis_server.url},
        "registries": [{"name": "docker.io", "url": fake.url}],
        "gc": {"delay": 0},
    }
    pt = build_pullthrough(settings_from_mapping(config, env={}))
    if not tell_tiers:
        pt.coord.tiers.deleted = lambda digests: None
    # S3 stores round Last-Modified up to the second: look from a moment later.
    return Collector(pt.store, pt.coord, pt.settings.gc, clock=lambda: time.time() + 5).run()


def link_key(digest: str, repo: str) -> str:
    hexpart = digest.split(":")[1]
    return f"repositories/docker.io/{repo}/_layers/sha256/{hexpart}"


def test_warm_gets_from_a_tier_ask_the_bucket_once_per_process_while_nothing_is_deleted(
    nodes, writer, fake, swift
):
    a, _b = nodes
    data, digest = in_bucket(writer, fake, "tierwarm", 2 * MIB)
    url = f"{a.url}/v2/library/tierwarm/blobs/{digest}"
    heads = swift.object_heads(blob_key(digest))
    link_heads = swift.object_heads(link_key(digest, "library/tierwarm"))
    for _ in range(12):
        status, body, _complete = fetch(url)
        assert status == 200 and body == data
    time.sleep(1)  # Swift logs a request when it ends
    # Each of the node's 2 workers asked once whether the blob exists (12 without reuse).
    assert 1 <= swift.object_heads(blob_key(digest)) - heads <= 2
    assert 1 <= swift.object_heads(link_key(digest, "library/tierwarm")) - link_heads <= 2


def test_a_copy_the_gc_deleted_is_never_served_by_a_node_that_missed_the_message(
    nodes, writer, fake, swift, redis_server, prefix
):
    a, _b = nodes
    data, digest = in_bucket(writer, fake, "tiermissed", 2 * MIB)
    url = f"{a.url}/v2/library/tiermissed/blobs/{digest}"
    for _ in range(8):  # both workers of the node have seen the bucket say it has it
        status, body, _complete = fetch(url)
        assert status == 200 and body == data
    wait_for(lambda: local_copy(a, digest).exists())
    del fake.routes[f"/v2/library/tiermissed/blobs/{digest}"]  # and upstream lost it too
    report = sweep(swift, prefix, redis_server, fake, tell_tiers=False)
    assert report["deleted_blobs"] >= 1
    time.sleep(0.5)
    assert local_copy(a, digest).exists()  # no message came
    # The sweep's deletions changed what the workers remembered: the bucket is asked again.
    for _ in range(4):
        response = requests.get(url, timeout=10)
        assert response.status_code == 404  # the bucket is the truth, not the local copy
    assert not local_copy(a, digest).exists()


def test_a_deletion_behind_the_caches_back_is_seen_within_lookup_ttl(
    tmp_path, redis_server, swift, fake, prefix, writer
):
    from tests.conftest import SWIFT_BUCKET

    node = start_node(tmp_path / "ttl", redis_server, swift, fake, prefix, lookup_ttl="2s")
    try:
        data, digest = in_bucket(writer, fake, "tierlost", 2 * MIB)
        url = f"{node.url}/v2/library/tierlost/blobs/{digest}"
        status, body, _complete = fetch(url)
        assert status == 200 and body == data
        wait_for(lambda: local_copy(node, digest).exists())
        # Gone from the bucket with no sweep (an operator, a lifecycle rule), and upstream.
        swift.client().delete_object(Bucket=SWIFT_BUCKET, Key=f"{prefix}/{blob_key(digest)}")
        del fake.routes[f"/v2/library/tierlost/blobs/{digest}"]
        deleted = time.monotonic()
        while (status := requests.get(url, timeout=10).status_code) == 200:
            assert time.monotonic() - deleted < 2 + 1, "served past lookup_ttl"
            time.sleep(0.1)
        assert status == 404
        assert not local_copy(node, digest).exists()
    finally:
        node.stop()


def test_eviction_past_max_size_never_cuts_a_stream_in_progress(
    tmp_path, redis_server, swift, fake, prefix, writer
):
    node = start_node(
        tmp_path / "small", redis_server, swift, fake, prefix, max_size="20MiB", low_watermark=0.9
    )
    try:
        first, first_digest = in_bucket(writer, fake, "evictfirst", 12 * MIB)
        second, second_digest = in_bucket(writer, fake, "evictsecond", 12 * MIB)
        status, body, _complete = fetch(f"{node.url}/v2/library/evictfirst/blobs/{first_digest}")
        assert status == 200 and body == first
        wait_for(lambda: local_copy(node, first_digest).exists())

        # A slow client of the first copy: it has read one chunk when the second lands.
        url = f"{node.url}/v2/library/evictfirst/blobs/{first_digest}"
        with requests.get(url, stream=True, timeout=30) as slow:
            chunks = slow.iter_content(64 * 1024)
            got = bytearray(next(chunks))
            status, body, _complete = fetch(
                f"{node.url}/v2/library/evictsecond/blobs/{second_digest}"
            )
            assert status == 200 and body == second
            # 24 MiB > 20 MiB: the least recently served copy (the first) goes, which is
            # enough to be under 90 % of 20 MiB.
            wait_for(lambda: not local_copy(node, first_digest).exists())
            assert local_copy(node, second_digest).exists()
            for chunk in chunks:
                got += chunk
        assert bytes(got) == first  # the stream that was reading it went on to its end
        assert metric(node, "pullthrough_local_tier_evictions_total") == 1
    finally:
        node.stop()


def test_a_blob_larger_than_the_tier_is_served_whole_to_every_client(
    tmp_path, redis_server, swift, fake, prefix
):
    """A blob larger than the tier keeps is read from the bucket, by cold clients (during
    the fill) and warm ones alike: every body whole and verified, nothing evicted."""
    node = start_node(
        tmp_path / "tiny", redis_server, swift, fake, prefix, max_size="4MiB", low_watermark=0.9
    )
    try:
        data = random.randbytes(6 * MIB)
        digest = fake.add_blob("library/toobig", data)
        url = f"{node.url}/v2/library/toobig/blobs/{digest}"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            cold = list(pool.map(lambda _: fetch(url), range(8)))  # during the fill
            warm = list(pool.map(lambda _: fetch(url), range(8)))  # from the bucket
        for status, body, complete in cold + warm:
            assert (
                status == 200
                and complete
                and hashlib.sha256(body).hexdigest() == (digest.split(":")[1])
            )
        assert not local_copy(node, digest).exists()
        assert metric(node, "pullthrough_local_tier_evictions_total") == 0
    finally:
        node.stop()


def test_a_node_killed_mid_copy_serves_nothing_of_the_partial_after_restart(
    tmp_path, redis_server, swift, fake, prefix
):
    # The node reaches the bucket through a 12 MiB/s link: its copy takes seconds.
    link = ThrottledRelay(swift.ports["proxy"], 12).start()
    workdir = tmp_path / "killed"
    node = start_node(workdir, redis_server, swift, fake, prefix)
    try:
        data = random.randbytes(30 * MIB)
        digest = fake.add_blob("library/tierkill", data)
        # Into the bucket through a node on the plain endpoint (fast), then copied in slowly.
        writer = start_node(tmp_path / "writer", redis_server, swift, fake, prefix)
        try:
            status, body, _complete = fetch(f"{writer.url}/v2/library/tierkill/blobs/{digest}")
            assert status == 200 and body == data
            # The client's last byte came once the writer's own copy was verified; the
            # bucket's copy lands a moment later.
            wait_for(lambda: in_the_bucket(swift, prefix, digest))
        finally:
            writer.stop()
        node.stop()
        config = yaml.safe_load(node.config_path.read_text())
        config["storage"]["s3"]["endpoint"] = link.url
        node.config_path.write_text(yaml.safe_dump(config))
        node = Gunicorn(node.config_path, workdir, workers=2).start()
        node.tier = workdir / "tier"
        hexpart = digest.split(":")[1]
        partial = node.tier / "partial" / "sha256" / hexpart
        reads = swift.object_gets(blob_key(digest))

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            cut = pool.submit(fetch, f"{node.url}/v2/library/tierkill/blobs/{digest}")
            wait_for(lambda: partial.exists() and partial.stat().st_size > 8 * MIB, 20)
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait()
            status, body, complete = cut.result()
        assert not (status == 200 and complete)  # the client was cut, not told it had it all
        assert partial.exists() and not local_copy(node, digest).exists()

        # Restarted: the dead copy is removed, never served; the blob is copied in again.
        node = Gunicorn(node.config_path, workdir, workers=2).start()
        node.tier = workdir / "tier"
        wait_for(lambda: not partial.exists(), 20)  # each worker cleans up as it starts
        assert not local_copy(node, digest).exists()
        status, body, complete = fetch(f"{node.url}/v2/library/tierkill/blobs/{digest}")
        assert status == 200 and complete and body == data
        wait_for(lambda: local_copy(node, digest).exists())
        assert local_copy(node, digest).read_bytes() == data
        time.sleep(0.5)
        assert swift.object_gets(blob_key(digest)) - reads == 2  # the cut copy, and this one
    finally:
        node.stop()
        link.stop()


def test_warm_through_a_tier_ends_only_once_the_bucket_holds_what_it_fetched(
    tmp_path, redis_server, swift, upstream, token_server, prefix
):
    """`warm` (and the follower's job, which rq ends with os._exit) returns when the last
    byte is read; through a tier that byte comes once the fill's bytes are verified, before
    the bucket's commit, which the fill's daemon thread would never make once the process
    ended: the blob would be in the node's tier and nowhere else."""
    image = single("tier/warmexit", "1", [make_layer(int.from_bytes(os.urandom(4)), 7 * MIB)])
    Pusher(upstream.url, token_server.realm, token_server.service).push(image)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": s3_section(
                    swift, prefix, local_cache={"path": str(tmp_path / "tier"), "max_size": "1GiB"}
                ),
                "redis": {"url": redis_server.url},
                "registries": [{"name": "docker.io", "url": upstream.url}],
            }
        )
    )
    run_module("registry", config, "warm", "tier/warmexit:1")
    for digest in image.blobs:
        assert in_the_bucket(swift, prefix, digest), digest


def test_a_copy_its_fill_put_in_place_goes_when_the_bucket_then_refuses_the_blob(tmp_path):
    """The fill's own copy goes into the tier when its bytes verify, before the bucket's
    commit; a commit that then fails (the S3 endpoint gone) must not leave the node a copy
    of a blob the bucket never got."""
    tier = LocalTier(tmp_path / "tier", 1 << 30)
    serving = TierServing(ContentStore(FilesystemDriver(tmp_path / "data")), tier, stall_timeout=5)
    data = os.urandom(100_000)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    copy = serving.node_copy(digest, len(data), 0)
    assert copy is not None
    copy.write(0, data)
    copy.verified()
    assert tier.complete(digest)  # its clients' last byte
    copy.failed(CacheUnavailable("the store is unreachable", reason="store unreachable"))
    copy.close()
    assert not tier.complete(digest)
    assert not any((tmp_path / "tier").rglob(digest.hex))


def test_a_node_that_missed_a_sweeps_message_drops_those_copies_once_it_listens(
    tmp_path, writer, fake, swift, redis_server, prefix
):
    """A sweep deleted blobs while the node was stopped (its message to the tiers went to
    nobody): once the node listens again it compares its tier with the bucket and drops
    those copies, not only the ones somebody asks for."""
    node = start_node(tmp_path / "node", redis_server, swift, fake, prefix)
    try:
        _data, digest = in_bucket(writer, fake, "tierstopped", 2 * MIB)
        kept_data, kept = in_bucket(writer, fake, "tierkept", 1 * MIB)
        for name, blob in (("tierstopped", digest), ("tierkept", kept)):
            status, _body, _complete = fetch(f"{node.url}/v2/library/{name}/blobs/{blob}")
            assert status == 200
        wait_for(lambda: local_copy(node, digest).exists() and local_copy(node, kept).exists())
    finally:
        node.stop()
    del fake.routes[f"/v2/library/tierstopped/blobs/{digest}"]
    report = sweep(swift, prefix, redis_server, fake)  # nobody listening on the node
    assert report["deleted_blobs"] >= 1 and not in_the_bucket(swift, prefix, digest)
    assert local_copy(node, digest).exists()
    # Unreferenced, the other went too; pulled again through another node, it is back.
    status, body, _complete = fetch(f"{writer.url}/v2/library/tierkept/blobs/{kept}")
    assert status == 200 and body == kept_data and in_the_bucket(swift, prefix, kept)
    node.start()
    try:
        wait_for(lambda: not local_copy(node, digest).exists())
        assert local_copy(node, kept).exists()  # the bucket has it: it stays
    finally:
        node.stop()


def test_a_reader_of_a_copy_dropped_and_made_anew_gets_the_one_in_place(tmp_path):
    """A client follows the node's copy as it grows; that copy breaks off and is dropped
    (its file unlinked), and another process copies the blob anew and puts it in place.
    The client's file never grows again: it must read the copy in place, not wait for the
    stall timeout and be cut at its last byte."""
    tier = LocalTier(tmp_path / "tier", 1 << 30)
    serving = TierServing(ContentStore(FilesystemDriver(tmp_path / "data")), tier, stall_timeout=2)
    data = os.urandom(4 * MIB)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    first = tier.claim(digest, len(data))
    assert first is not None
    first.write(data[: 2 * MIB])
    stream = serving.stream(digest, len(data), 0, len(data) - 1)
    got = next(stream)
    while len(got) < 2 * MIB:
        got += next(stream)
    first.discard()  # it broke off (the bucket went away) and was dropped
    first.close()
    second = tier.claim(digest, len(data))
    assert second is not None
    second.write(data)
    assert second.commit()
    second.close()
    got += b"".join(stream)
    assert got == data
