"""Parallel range fills (registry/pullthrough/ranges.py) against real gunicorn and a fake
upstream on loopback that records every Range it is asked for and every body byte it sends:
ranges out of order, one range failing, an upstream that ignores Range, a redirect per range,
a fetcher killed with ranges half done, a herd joining a parallel fill."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import signal
import socket
import time
import uuid

import pytest
import redis as redis_lib
import yaml
from playwright.sync_api import sync_playwright

from tests.conftest import s3_section
from tests.support.clients import fetch
from tests.support.fakes import FakeRegistry
from tests.support.servers import Gunicorn, ThrottledRelay, proc_stat, require

pytestmark = pytest.mark.usefixtures("forget_upstream_health")

MIB = 1 << 20
FIRST = MIB  # range_min_size here: the first range asked for
AUTH = "Basic " + base64.b64encode(b"puller:s3cret").decode()


@pytest.fixture(scope="module")
def fake():
    server = FakeRegistry().start()
    server.require_authorization = AUTH
    yield server
    server.stop()


# The fake behind two links as in `make bench`: one cap shared by every connection (a home
# link), and a cap per connection under a larger total (a CDN).
SHARED_MIBPS = 4
CDN_CONNECTION_MIBPS, CDN_TOTAL_MIBPS = 2, 32


@pytest.fixture(scope="module")
def links(fake):
    relays = {
        "shared.test": ThrottledRelay(fake.port, SHARED_MIBPS).start(),
        "cdn.test": ThrottledRelay(fake.port, CDN_TOTAL_MIBPS, CDN_CONNECTION_MIBPS).start(),
    }
    yield relays
    for relay in relays.values():
        relay.stop()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, redis_server, fake, links):
    credentials = {"username": "puller", "password": "s3cret"}
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("ranges"),
        redis_server.url,
        [
            {"name": "docker.io", "url": fake.url, **credentials},
            *({"name": name, "url": relay.url, **credentials} for name, relay in links.items()),
        ],
        upstream={
            "connect_timeout": 1,
            "read_timeout": 2,
            "lease_ttl": 2,
            "parallel_ranges": 4,
            "range_min_size": FIRST,
        },
    )
    yield server
    server.stop()


def blob_gets(fake: FakeRegistry, digest: str, since: int = 0) -> list[str | None]:
    """The Range header of every GET of the blob that was answered (with our credentials at
    the registry, or at its CDN) since `since`."""
    out = []
    rows = zip(fake.hits[since:], fake.ranges[since:], fake.authorizations[since:], strict=True)
    for (method, path), rng, auth in rows:
        if method == "GET" and ((digest in path and auth == AUTH) or path.startswith("/_cdn/")):
            out.append(rng)
    return out


def spans(ranges: list[str | None]) -> list[tuple[int, int]]:
    """(first, last) byte of each `bytes=first-last`, in order of first."""
    out = []
    for rng in ranges:
        assert rng is not None and rng.startswith("bytes="), rng
        low, _, high = rng[6:].partition("-")
        out.append((int(low), int(high)))
    return sorted(out)


def leftovers(cache) -> list[str]:
    return sorted(p.name for p in (cache.data / "uploads").rglob("*") if p.is_file())


def committed(cache, digest: str) -> bool:
    hexpart = digest.split(":")[1]
    return (cache.data / "blobs" / "sha256" / hexpart[:2] / hexpart).exists()


def test_a_big_blob_is_fetched_as_concurrent_ranges_that_cover_it_once(cache, fake):
    data = random.randbytes(6 * MIB)
    digest = fake.add_blob("library/parallel", data, trickle=0.01)
    mark, sent, fake.max_active = len(fake.hits), fake.body_bytes, 0
    status, body, complete = fetch(f"{cache.url}/v2/library/parallel/blobs/{digest}")
    assert status == 200 and complete and body == data
    ranges = spans(blob_gets(fake, digest, mark))
    # The first asks for range_min_size (a 206 shows Range is honoured), then the rest in
    # segments that tile the blob: no byte asked for twice, none missing.
    assert ranges[0] == (0, FIRST - 1)
    assert len(ranges) > 4
    assert ranges[-1][1] == len(data) - 1
    for (_a, b), (c, _d) in itertools.pairwise(ranges):
        assert c == b + 1, ranges
    assert fake.body_bytes - sent == len(data)
    assert fake.max_active == 4  # parallel_ranges at once, never more
    assert committed(cache, digest) and leftovers(cache) == []


def _spread_line(cache, digest: str) -> re.Match | None:
    """The fill's account of what more ranges got against one (range_workers.RangedCopy)."""
    return re.search(
        rf"(\d+) ranges of {digest} got ([\d.]+) MiB/s against ([\d.]+) MiB/s for one: "
        r"(one stream|all) go(?:es)? on",
        cache.log_path.read_text(errors="replace"),
    )


def test_ranges_that_only_split_a_shared_link_finish_their_segments_and_one_stream_goes_on(
    cache, fake, links
):
    data = random.randbytes(16 * MIB)
    digest = fake.add_blob("library/shared-link", data)
    mark, sent = len(fake.hits), fake.body_bytes
    url = f"{cache.url}/v2/shared.test/library/shared-link/blobs/{digest}"
    status, body, complete = fetch(url)
    assert status == 200 and complete and body == data
    # The first range alone got the link; four got the same link, split: the fill said so,
    # with rates no faster than the link.
    line = _spread_line(cache, digest)
    assert line is not None and line[4] == "one stream", line
    four, one = float(line[2]), float(line[3])
    assert one <= SHARED_MIBPS * 1.3 and four <= SHARED_MIBPS * 1.3 and four < 1.5 * one
    # The rest nobody had begun went as one request, many planned segments long (spread,
    # every request is one segment: at most 1 MiB here); nothing was fetched twice.
    ranges = spans(blob_gets(fake, digest, mark))
    assert max(high - low + 1 for low, high in ranges[1:]) >= 4 * MIB, ranges
    for (_a, b), (c, _d) in itertools.pairwise(ranges):
        assert c == b + 1, ranges
    assert fake.body_bytes - sent == len(data)
    assert committed(cache, digest)


def test_ranges_on_a_link_capped_per_connection_all_go_on(cache, fake, links):
    data = random.randbytes(12 * MIB)
    digest = fake.add_blob("library/cdn-link", data)
    mark, sent = len(fake.hits), fake.body_bytes
    status, body, complete = fetch(f"{cache.url}/v2/cdn.test/library/cdn-link/blobs/{digest}")
    assert status == 200 and complete and body == data
    line = _spread_line(cache, digest)
    assert line is not None and line[4] == "all", line
    assert float(line[2]) >= 1.5 * float(line[3])
    assert float(line[3]) <= CDN_CONNECTION_MIBPS * 1.3
    # Every request after the first is one planned segment (about 0.7 MiB here).
    ranges = spans(blob_gets(fake, digest, mark))
    assert len(ranges) > 8 and max(h - lo + 1 for lo, h in ranges[1:]) < 2 * MIB, ranges
    assert fake.body_bytes - sent == len(data)


def test_ranges_arriving_out_of_order_wait_in_extents_and_clients_get_bytes_in_order(
    cache, fake, redis_server
):
    data = random.randbytes(6 * MIB)
    # The first range (bytes 0-1 MiB) crawls: every later range lands before it.
    digest = fake.add_blob("library/outoforder", data, fault_at=0, trickle=0.1)
    url = f"{cache.url}/v2/library/outoforder/blobs/{digest}"
    redis = redis_lib.Redis.from_url(redis_server.url)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(fetch, url) for _ in range(4)]
        side_files: set[str] = set()
        marked: list[tuple[int, list]] = []  # (bytes in order, ranges past them) on disk
        upload = cache.data / "uploads" / "sha256" / digest.split(":")[1]
        most_ahead = 0
        while not all(f.done() for f in futures):
            side_files.update(n for n in leftovers(cache) if "." in n)
            with contextlib.suppress(OSError):  # not there yet, or no longer marked
                marked.append(
                    (
                        int(os.getxattr(upload, "user.pullthrough.prefix")),
                        json.loads(os.getxattr(upload, "user.pullthrough.extents")),
                    )
                )
            record = redis.hgetall(f"pt:fill:{digest}")
            if record.get(b"ranges"):
                rows = json.loads(record[b"ranges"])
                stored = int(record.get(b"stored") or 0)
                ahead = sum(pos - start for start, pos, _end in rows if start >= FIRST)
                if stored < FIRST:
                    most_ahead = max(most_ahead, ahead)
            time.sleep(0.05)
        results = [f.result() for f in futures]
    for status, body, complete in results:
        assert status == 200 and complete and body == data
    # Bytes past the slow first range were written into the upload where they lie while the
    # bytes in order lagged (ext4 keeps user attributes: no side file, no second write); the
    # upload's mark kept followers to the bytes in order.
    assert not side_files
    assert any(prefix < FIRST and ahead for prefix, ahead in marked), marked[:3]
    assert all(start >= prefix for prefix, ahead in marked for start, _end in ahead)
    assert most_ahead > 2 * MIB
    assert leftovers(cache) == []


def test_a_range_that_breaks_is_asked_for_again_from_its_own_next_byte(cache, fake):
    data = random.randbytes(6 * MIB)
    # In the first range, past two of our 256 KiB reads (a reset loses the read under way).
    cut = 700_000
    digest = fake.add_blob(
        "library/onebreaks", data, fault_at=cut, send_bytes=cut, reset=True, faulty_requests=1
    )
    mark, sent = len(fake.hits), fake.body_bytes
    status, body, complete = fetch(f"{cache.url}/v2/library/onebreaks/blobs/{digest}")
    assert status == 200 and complete and body == data
    ranges = spans(blob_gets(fake, digest, mark))
    broken = (0, FIRST - 1)
    assert broken in ranges
    again = [r for r in ranges if r[1] == broken[1] and r != broken]
    # Asked again for the rest of that range only: from past its start, to its end.
    assert len(again) == 1 and broken[0] < again[0][0] <= cut, ranges
    overlap = cut - again[0][0]  # sent before the reset, lost with it
    assert fake.body_bytes - sent == len(data) + overlap
    assert leftovers(cache) == []


def test_a_range_that_stalls_is_given_up_after_the_read_timeout_and_asked_for_again(cache, fake):
    data = random.randbytes(6 * MIB)
    stall_at = 3 * MIB + 100_000
    # The range holding `stall_at` sends its headers, then nothing for longer than the read
    # timeout (2 s here); once.
    digest = fake.add_blob(
        "library/stalls", data, fault_at=stall_at, body_delay=5, faulty_requests=1
    )
    mark, sent = len(fake.hits), fake.body_bytes
    status, body, complete = fetch(f"{cache.url}/v2/library/stalls/blobs/{digest}")
    assert status == 200 and complete and body == data
    ranges = spans(blob_gets(fake, digest, mark))
    stalled = [r for r in ranges if r[0] <= stall_at <= r[1]]
    # Asked twice, the second time from its own start (nothing had come), not the blob's.
    assert len(stalled) == 2 and stalled[0] == stalled[1] and stalled[0][0] > 0, ranges
    # The stalled answer's first write after its pause may still reach the closed socket's
    # kernel buffer before the reset: at most one 64 KiB chunk.
    assert 0 <= fake.body_bytes - sent - len(data) <= 64 * 1024


def test_later_ranges_answered_with_other_bytes_end_in_one_stream_not_whole_gets_per_range(
    cache, fake
):
    data = random.randbytes(6 * MIB)
    # The first range (from 0) is right; every later one comes back as the blob's start.
    digest = fake.add_blob("library/misplaced", data, misplaced_ranges=True)
    mark = len(fake.hits)
    status, body, complete = fetch(f"{cache.url}/v2/library/misplaced/blobs/{digest}")
    assert status == 200 and complete and body == data
    gets = blob_gets(fake, digest, mark)
    # The parallel fill failed on its later ranges without asking for the whole blob in
    # their place; its takeover, whose first range came back wrong too, fell back to one
    # stream of the whole blob: once.
    assert gets.count(None) == 1, gets


def test_an_upstream_that_ignores_range_is_one_stream_and_nothing_twice(cache, fake):
    data = random.randbytes(5 * MIB)
    digest = fake.add_blob("library/norange", data, honour_range=False)
    mark, sent = len(fake.hits), fake.body_bytes
    status, body, complete = fetch(f"{cache.url}/v2/library/norange/blobs/{digest}")
    assert status == 200 and complete and body == data
    assert blob_gets(fake, digest, mark) == [f"bytes=0-{FIRST - 1}"]  # answered with a 200
    assert fake.body_bytes - sent == len(data)


def test_each_range_follows_its_own_redirect_without_credentials_and_a_dead_url_is_renewed(
    cache, fake
):
    data = random.randbytes(6 * MIB)
    cut = 3 * MIB + 400_000
    # Every GET is sent to a one-time CDN URL; the range holding `cut` breaks there once, and
    # its URL is then spent (403): finishing needs a new URL from the registry.
    digest = fake.add_blob(
        "library/cdn", data, cdn=True, fault_at=cut, send_bytes=cut, reset=True, faulty_requests=1
    )
    mark = len(fake.hits)
    status, body, complete = fetch(f"{cache.url}/v2/library/cdn/blobs/{digest}")
    assert status == 200 and complete and body == data
    hits = list(zip(fake.hits[mark:], fake.authorizations[mark:], strict=True))
    at_registry = [a for (m, p), a in hits if m == "GET" and digest in p and a is not None]
    at_cdn = [(p, a) for (m, p), a in hits if m == "GET" and p.startswith("/_cdn/")]
    assert len(at_registry) == len(at_cdn) > 4  # one redirect per range, the retry included
    assert set(at_registry) == {AUTH}
    assert {a for _p, a in at_cdn} == {None}  # the credentials never went to the CDN
    assert len({p for p, _a in at_cdn}) == len(at_cdn)  # no URL used twice
    assert committed(cache, digest)


def test_a_fetcher_killed_with_ranges_half_done_is_taken_over_fetching_only_the_rest(
    cache, fake, redis_server
):
    data = random.randbytes(8 * MIB)
    digest = fake.add_blob("library/killranges", data, trickle=0.1)
    url = f"{cache.url}/v2/library/killranges/blobs/{digest}"
    redis = redis_lib.Redis.from_url(redis_server.url)
    mark, sent = len(fake.hits), fake.body_bytes
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(fetch, url) for _ in range(6)]
        deadline = time.monotonic() + 30
        rows: list = []
        while time.monotonic() < deadline:
            record = redis.hgetall(f"pt:fill:{digest}")
            rows = json.loads(record.get(b"ranges") or b"[]")
            started = [r for r in rows if r[1] > r[0]]
            half_done = [r for r in rows if r[0] < r[1] < r[2]]
            held = sum(r[1] - r[0] for r in rows)
            if len(started) >= 4 and len(half_done) >= 2 and held >= 2 * MIB:
                break
            time.sleep(0.05)
        holder = redis.get(f"pt:lease:blob:{digest}")
        assert holder is not None and len(started) >= 4, rows
        assert len(half_done) >= 2, rows  # ranges cut in their middle
        os.kill(int(holder.decode().split(":")[1]), signal.SIGKILL)
        held = sum(r[1] - r[0] for r in rows)
        results = [f.result() for f in futures]
    for status, body, complete in results:
        assert status != 200 or not complete or body == data
    status, body, complete = fetch(url)
    assert status == 200 and complete and body == data
    assert committed(cache, digest) and leftovers(cache) == []
    # What the takeover asked for: no range from 0 again, and the bytes upstream sent are the
    # blob plus only what was in flight when the fetcher died (far less than was held).
    after_kill = spans(blob_gets(fake, digest, mark))
    assert sum(1 for r in after_kill if r[0] == 0) == 1, after_kill
    extra = fake.body_bytes - sent - len(data)
    assert extra < held / 2, (extra, held)


def test_a_herd_joining_a_parallel_fill_gets_the_blob_from_one_set_of_ranges(cache, fake):
    data = random.randbytes(6 * MIB)
    digest = fake.add_blob("library/rangeherd", data, trickle=0.01)
    url = f"{cache.url}/v2/library/rangeherd/blobs/{digest}"
    mark, sent = len(fake.hits), fake.body_bytes

    def one(_):
        status, body, complete = fetch(url)
        return status, complete, hashlib.sha256(body).hexdigest()

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    assert set(results) == {(200, True, digest.split(":")[1])}
    ranges = spans(blob_gets(fake, digest, mark))
    assert ranges[0] == (0, FIRST - 1) and sum(b - a + 1 for a, b in ranges) == len(data)
    assert fake.body_bytes - sent == len(data)


def test_the_fetching_page_shows_each_range_of_a_parallel_fill_as_it_runs(cache, fake):
    data = random.randbytes(8 * MIB)
    digest = fake.add_blob("library/uiranges", data, trickle=0.15)  # a fill of about 5 s
    mark = len(fake.hits)
    shown: list[tuple[int, int, int]] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pulled = pool.submit(fetch, f"{cache.url}/v2/library/uiranges/blobs/{digest}")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=require("chromium"), args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not pulled.done():
                page.goto(f"{cache.url}/ui/fetching")
                row = page.locator(f'#fetching tr[data-digest="{digest}"]')
                if not row.count():
                    continue
                items = row.locator("ul.ranges li").all()
                rows = [
                    tuple(int(li.get_attribute(f"data-{k}") or -1) for k in ("start", "pos", "end"))
                    for li in items
                ]
                if sum(1 for start, pos, end in rows if start < pos < end) >= 2:
                    shown, node = rows, row.locator("td.node").inner_text()
                    text = row.inner_text()
                    break
            browser.close()
        status, body, complete = pulled.result()
    assert status == 200 and complete and body == data
    assert shown, "the page never showed two ranges under way"
    # Each range shown is one that upstream was asked for, its progress inside it.
    asked = spans(blob_gets(fake, digest, mark))
    for start, pos, end in shown:
        assert (start, end - 1) in asked, (start, end, asked)
        assert start <= pos <= end
    assert node == socket.gethostname()  # the node fetching it
    assert "in order" in text and "%" in text


PIECE = 5 * MIB  # storage.s3.part_size of s3_section, and range_min_size of the S3 node


@pytest.fixture(scope="module")
def s3_node(tmp_path_factory, redis_server, fake, swift):
    prefix = f"ranges/{uuid.uuid4().hex}"
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("ranges-s3"),
        redis_server.url,
        [{"name": "docker.io", "url": fake.url, "username": "puller", "password": "s3cret"}],
        storage=s3_section(swift, prefix),
        upstream={
            "connect_timeout": 1,
            "read_timeout": 2,
            "lease_ttl": 2,
            "parallel_ranges": 4,
            "range_min_size": PIECE,
        },
    )
    server.prefix = prefix
    yield server
    server.stop()


def bucket_keys(swift, prefix: str) -> list[tuple[str, int]]:
    from tests.conftest import SWIFT_BUCKET

    pages = swift.client().get_paginator("list_objects_v2")
    return [
        (item["Key"][len(prefix) + 1 :], item["Size"])
        for page in pages.paginate(Bucket=SWIFT_BUCKET, Prefix=prefix + "/")
        for item in page.get("Contents", [])
    ]


def test_on_s3_ranges_start_on_the_pieces_and_are_stored_as_the_fills_own_pieces(
    s3_node, fake, swift
):
    data = random.randbytes(4 * PIECE + 123_457)
    # The first range crawls: the others' pieces are stored before it has one.
    digest = fake.add_blob("library/s3ranges", data, fault_at=0, trickle=0.12)
    hexpart = digest.split(":")[1]
    mark, sent = len(fake.hits), fake.body_bytes
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pulls = [
            pool.submit(fetch, f"{s3_node.url}/v2/library/s3ranges/blobs/{digest}")
            for _ in range(2)
        ]
        ahead: set[int] = set()
        while not all(p.done() for p in pulls):
            pieces = {
                int(key.rsplit("/", 1)[1]): size
                for key, size in bucket_keys(swift, s3_node.prefix)
                if key.startswith(f"uploads/sha256/{hexpart}/")
            }
            if 0 not in pieces:
                ahead.update(pieces)
            time.sleep(0.1)
        results = [p.result() for p in pulls]
    for status, body, complete in results:
        assert status == 200 and complete and body == data
    ranges = spans(blob_gets(fake, digest, mark))
    assert ranges[0] == (0, PIECE - 1) and len(ranges) == 5
    assert all(start % PIECE == 0 for start, _end in ranges)  # on the pieces' grid
    assert ahead and all(offset % PIECE == 0 and offset > 0 for offset in ahead)
    assert fake.body_bytes - sent == len(data)
    keys = dict(bucket_keys(swift, s3_node.prefix))
    assert keys[f"blobs/sha256/{hexpart[:2]}/{hexpart}"] == len(data)
    assert not [k for k in keys if k.startswith("uploads/")]


def wait_exited(pid: int, timeout: float = 10.0) -> None:
    """Until the process has exited (its sockets closed): gone, or a zombie not yet reaped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = proc_stat(pid)[0]
        except OSError:  # gone
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still runs {timeout} s after SIGKILL")


def test_on_s3_a_fetcher_killed_with_ranges_stored_ahead_is_taken_over_from_its_pieces(
    s3_node, fake, swift, redis_server
):
    data = random.randbytes(4 * PIECE + 99_999)
    # Slow enough that the pieces ahead are stored while the first range crawls.
    digest = fake.add_blob("library/s3killed", data, trickle=0.03)
    slow = fake.routes[f"/v2/library/s3killed/blobs/{digest}"]
    slow.fault_at, slow.trickle = 0, 0.3
    hexpart = digest.split(":")[1]
    url = f"{s3_node.url}/v2/library/s3killed/blobs/{digest}"
    redis = redis_lib.Redis.from_url(redis_server.url)
    mark, sent = len(fake.hits), fake.body_bytes
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pulled = pool.submit(fetch, url)
        deadline = time.monotonic() + 60
        pieces: dict[int, int] = {}
        while time.monotonic() < deadline:
            pieces = {
                int(key.rsplit("/", 1)[1]): size
                for key, size in bucket_keys(swift, s3_node.prefix)
                if key.startswith(f"uploads/sha256/{hexpart}/")
            }
            if len([o for o in pieces if o > 0]) >= 2:
                break
            time.sleep(0.1)
        holder = redis.get(f"pt:lease:blob:{digest}")
        assert holder is not None and len(pieces) >= 2, pieces
        worker = int(holder.decode().split(":")[1])
        os.kill(worker, signal.SIGKILL)
        at_kill, killed_at = fake.body_bytes, len(fake.hits)
        # The takeover's first range comes at full speed; set while the killed worker still
        # held its sockets, the dead range's own sending would speed up into their buffers.
        wait_exited(worker)
        slow.trickle = 0.0
        pulled.result()
    status, body, complete = fetch(url)
    assert status == 200 and complete and body == data
    after = spans(blob_gets(fake, digest, mark))
    # No piece stored ahead was asked for again: each was skipped by the takeover.
    for offset in (o for o in pieces if o > 0):
        assert sum(1 for a, b in after if a <= offset <= b) == 1, (offset, after)
    # After the kill upstream sent at most what the stored pieces did not hold (plus what
    # was still on its way to the dead worker's sockets: a read of 256 KiB on each of its
    # four ranges; a piece asked for again would be 5 MiB).
    stored = sum(pieces.values())
    in_flight = 4 * 256 * 1024
    # (What upstream was asked after the kill names where any excess went.)
    assert fake.body_bytes - at_kill <= len(data) - stored + in_flight, (
        stored,
        pieces,
        blob_gets(fake, digest, killed_at),
    )
    assert at_kill > sent
    keys = dict(bucket_keys(swift, s3_node.prefix))
    assert keys[f"blobs/sha256/{hexpart[:2]}/{hexpart}"] == len(data)
    assert not [k for k in keys if k.startswith("uploads/")]


def test_a_node_waits_out_a_slow_first_piece_while_the_ranges_ahead_still_arrive(
    s3_node, fake, swift, tmp_path, redis_server
):
    # A second node on the same bucket: its client reads the fill piece by piece, and the
    # first piece (5 MiB at about 0.5 MiB/s) takes longer than a follower waits for bytes in
    # front of it (read_timeout + 3 lease_ttl: 8 s here); the ranges ahead arrive all along.
    config = yaml.safe_load(s3_node.config_path.read_text())
    other = Gunicorn.with_config(
        tmp_path / "other-node",
        redis_server.url,
        config["registries"],
        storage=config["storage"],
        upstream=config["upstream"],
    )
    try:
        data = random.randbytes(4 * PIECE + 77_777)
        digest = fake.add_blob(
            "library/slowpiece", data, fault_at=0, trickle=0.12, rest_trickle=0.1
        )
        path = f"/v2/library/slowpiece/blobs/{digest}"
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            # One node fetches, the other follows it from the pieces (whichever is first).
            results = list(pool.map(fetch, [s3_node.url + path, other.url + path]))
        waited = time.monotonic() - started
        for status, body, complete in results:
            assert status == 200 and complete and body == data
        assert waited > 8  # longer than the stall timeout, yet the fill was alive
    finally:
        other.stop()
