"""One suite for both storage drivers: a directory, and an S3 bucket on a real Swift.

Everything above the driver relies on what these tests prove of each: absent things read as
absent, writes are whole or not there, listings, paths that escape are refused, and partial
content that a follower reads while it grows, resumes after its writer died, and commits in
one step.
"""

from __future__ import annotations

import errno
import os
import time
import uuid

import pytest
import requests

from registry.store import FilesystemDriver
from registry.store.s3 import S3Driver, s3_client
from tests.conftest import SWIFT_BUCKET
from tests.support.fakes import StallingRelay, TamperingRelay
from tests.support.swift import ACCESS_KEY, REGION, SECRET_KEY

PIECE = 5 << 20


@pytest.fixture(params=["filesystem", "s3"])
def driver(request, tmp_path):
    if request.param == "filesystem":
        return FilesystemDriver(tmp_path / "data")
    swift = request.getfixturevalue("swift")
    return S3Driver(
        swift.client(), SWIFT_BUCKET, prefix=f"drivers/{uuid.uuid4().hex}", part_size=PIECE
    )


def test_absent_things_read_as_absent(driver):
    assert driver.stat("blobs/x") is None
    assert driver.mtime("blobs/x") is None
    assert driver.read("blobs/x") is None
    assert driver.list("blobs") == []
    assert list(driver.walk_files("blobs")) == []
    assert driver.delete("blobs/x") is False
    follower = driver.open_partial_read("uploads/sha256/abc")
    assert follower is None or follower.available() == 0  # S3: a follower of no pieces yet
    assert driver.partial_size("uploads/sha256/abc") is None
    with pytest.raises(FileNotFoundError):
        driver.open_read("blobs/x")


def test_written_objects_read_list_and_delete(driver):
    before = time.time() - 60
    driver.write_atomic("repositories/a/_manifests/tags/v1", b"one")
    driver.write_atomic("repositories/a/_manifests/tags/v2", b"two")
    driver.write_atomic("repositories/a/_layers/sha256/ff", b"")
    driver.write_atomic("repositories/a/_manifests/tags/v1", b"one again")

    assert driver.read("repositories/a/_manifests/tags/v1") == b"one again"
    assert driver.stat("repositories/a/_manifests/tags/v2") == 3
    assert driver.mtime("repositories/a/_manifests/tags/v2") >= before
    assert driver.list("repositories/a") == ["_layers", "_manifests"]
    assert driver.list("repositories/a/_manifests/tags") == ["v1", "v2"]
    assert sorted(driver.walk_files("repositories")) == [
        "repositories/a/_layers/sha256/ff",
        "repositories/a/_manifests/tags/v1",
        "repositories/a/_manifests/tags/v2",
    ]
    sizes = {path: size for path, size, _mtime in driver.walk_stat("repositories/a/_manifests")}
    assert sizes == {
        "repositories/a/_manifests/tags/v1": 9,
        "repositories/a/_manifests/tags/v2": 3,
    }

    driver.touch("repositories/a/_layers/sha256/ee")
    driver.touch("repositories/a/_manifests/tags/v2")  # exists: left as it is
    assert driver.stat("repositories/a/_layers/sha256/ee") == 0
    assert driver.read("repositories/a/_manifests/tags/v2") == b"two"

    assert driver.delete("repositories/a/_manifests/tags/v1") is True
    assert driver.delete("repositories/a/_manifests/tags/v1") is False
    assert driver.read("repositories/a/_manifests/tags/v1") is None
    driver.prune_tree("repositories/a", "repositories")
    assert driver.list("repositories/a/_manifests/tags") == ["v2"]


@pytest.mark.parametrize("path", ["../escape", "blobs/../../escape", "/etc/passwd", "a/\x00b"])
def test_paths_that_escape_are_refused(driver, path):
    with pytest.raises(ValueError, match="escapes"):
        driver.write_atomic(path, b"x")
    with pytest.raises(ValueError, match="escapes"):
        driver.stat(path)


def test_committed_object_reads_from_any_offset(driver):
    data = os.urandom(3 << 20)
    driver.write_atomic("blobs/sha256/ab/abc", data)
    with driver.open_read("blobs/sha256/ab/abc") as handle:
        handle.seek(1_000_000)
        assert handle.read(10) == data[1_000_000:1_000_010]
        assert handle.read(5) == data[1_000_010:1_000_015]
        handle.seek(7)
        assert handle.read(3) == data[7:10]


def _write(writer, data: bytes, start: int = 0, chunk: int = 1 << 20) -> None:
    for offset in range(start, len(data), chunk):
        writer.pwrite(data[offset : offset + chunk], offset)


def test_partial_is_followed_while_it_grows_and_commits_whole(driver):
    data = os.urandom(2 * PIECE + 123_456)
    writer = driver.open_partial("uploads/sha256/abc", len(data))
    _write(writer, data[: PIECE + 1])
    follower = driver.open_partial_read("uploads/sha256/abc")
    assert follower is not None
    # A follower in the writer's process sees every byte written so far: on S3 the stored
    # piece, and the byte after it from the writer's memory (other processes see pieces).
    assert follower.available() == PIECE + 1
    assert follower.read_at(PIECE, 10) == data[PIECE : PIECE + 1]
    assert follower.read_at(0, 1000) == data[:1000]
    assert follower.read_at(PIECE - 10, 10) == data[PIECE - 10 : PIECE]

    _write(writer, data, start=PIECE + 1)
    deadline = time.monotonic() + 2
    while follower.available() < 2 * PIECE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert follower.read_at(PIECE, 1 << 20) == data[PIECE : PIECE + (1 << 20)]

    writer.commit("blobs/sha256/ab/abc")
    writer.close()
    follower.close()
    assert driver.stat("blobs/sha256/ab/abc") == len(data)
    assert driver.read("blobs/sha256/ab/abc") == data
    assert driver.partial_size("uploads/sha256/abc") is None
    assert list(driver.list_partials("uploads")) == []


def test_partial_smaller_than_a_piece_commits(driver):
    data = os.urandom(1000)
    writer = driver.open_partial("uploads/sha256/small", len(data))
    writer.pwrite(data, 0)
    writer.commit("blobs/sha256/sm/small")
    assert driver.read("blobs/sha256/sm/small") == data
    assert list(driver.list_partials("uploads")) == []


def test_partial_left_by_a_dead_writer_resumes(driver):
    data = os.urandom(2 * PIECE + 4096)
    writer = driver.open_partial("uploads/sha256/abc", len(data))
    _write(writer, data[: 2 * PIECE + 100])
    writer.close()  # the writer's process dies: what was not stored is gone

    resumable = driver.partial_size("uploads/sha256/abc")
    assert 0 < resumable <= 2 * PIECE + 100
    [(path, mtime)] = driver.list_partials("uploads")
    assert path == "uploads/sha256/abc" and mtime > time.time() - 60

    again = driver.open_partial("uploads/sha256/abc", len(data))
    assert again.read_range(0, 1000) == data[:1000]
    assert again.read_range(resumable - 10, 10) == data[resumable - 10 : resumable]
    _write(again, data, start=resumable)
    again.commit("blobs/sha256/ab/abc")
    assert driver.read("blobs/sha256/ab/abc") == data


def test_partial_discarded_and_restarted(driver):
    data = os.urandom(PIECE + 10)
    writer = driver.open_partial("uploads/sha256/abc", len(data))
    _write(writer, data)
    writer.truncate(0)
    assert not driver.partial_size("uploads/sha256/abc")
    _write(writer, data)
    writer.discard()
    assert driver.partial_size("uploads/sha256/abc") is None
    assert driver.delete_partial("uploads/sha256/abc") is False


# -- S3 only ---------------------------------------------------------------------------------------
def test_batch_delete_carries_content_md5_for_older_stores(swift):
    """Swift 2.30 refuses DeleteObjects without Content-MD5, which botocore no longer sends."""
    import boto3
    from botocore.config import Config

    prefix = f"md5/{uuid.uuid4().hex}"
    driver = S3Driver(swift.client(), SWIFT_BUCKET, prefix=prefix)
    for name in ("a", "b"):
        driver.write_atomic(name, b"x")
    plain = boto3.session.Session().client(
        "s3",
        endpoint_url=swift.endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(
            region_name=REGION,
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
        ),
    )
    keys = {"Objects": [{"Key": f"{prefix}/a"}, {"Key": f"{prefix}/b"}]}
    with pytest.raises(Exception, match=r"Content-MD5|InvalidRequest|MissingContentMD5"):
        plain.delete_objects(Bucket=SWIFT_BUCKET, Delete=keys)
    assert driver.stat("a") == 1

    driver.delete_many(["a", "b"])
    assert driver.stat("a") is None and driver.stat("b") is None


def test_a_body_changed_on_its_way_to_the_bucket_is_refused_not_stored(swift):
    """A fill's pieces (and every small object) are PUT by write_atomic with their SHA-256
    signed, which the store checks against the bytes it got: one flipped bit on the way is a
    failed write, never a stored piece that a commit would make part of a blob."""
    relay = TamperingRelay(swift.ports["proxy"]).start()
    try:
        prefix = f"tamper/{uuid.uuid4().hex}"
        through_relay = S3Driver(
            s3_client(relay.url, ACCESS_KEY, SECRET_KEY, REGION), SWIFT_BUCKET, prefix=prefix
        )
        piece = "uploads/sha256/abc/0000000000000000"
        with pytest.raises(OSError, match="write"):
            through_relay.write_atomic(piece, os.urandom(PIECE))
        assert relay.tampered >= 1
        direct = S3Driver(swift.client(), SWIFT_BUCKET, prefix=prefix)
        assert direct.stat(piece) is None
    finally:
        relay.stop()


def _open_uploads(driver, dest: str) -> list[str]:
    key = driver.key(dest)
    found = driver.client.list_multipart_uploads(Bucket=SWIFT_BUCKET, Prefix=key)
    return [u["UploadId"] for u in found.get("Uploads", []) if u["Key"] == key]


def _uploads_once_settled(driver, dest: str, timeout: float = 10.0) -> list[str]:
    """The open uploads of `dest` once none is left, or after `timeout` (an abort is made
    by the copier thread once it stops)."""
    deadline = time.monotonic() + timeout
    while (uploads := _open_uploads(driver, dest)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return uploads


def _copied_parts(driver, dest: str, timeout: float = 10.0, want: int = 0) -> list[int]:
    """The parts of the one open upload of `dest`, once there are `want` of them."""
    deadline = time.monotonic() + timeout
    while True:
        numbers = []
        for upload in _open_uploads(driver, dest):
            listed = driver.client.list_parts(
                Bucket=SWIFT_BUCKET, Key=driver.key(dest), UploadId=upload
            )
            numbers += [p["PartNumber"] for p in listed.get("Parts", [])]
        if len(numbers) >= want or time.monotonic() > deadline:
            return sorted(numbers)
        time.sleep(0.1)


def _s3(swift, name: str) -> S3Driver:
    return S3Driver(
        swift.client(), SWIFT_BUCKET, prefix=f"{name}/{uuid.uuid4().hex}", part_size=PIECE
    )


def test_a_commit_is_assembled_as_the_pieces_are_stored(swift):
    """Each piece is copied into the blob's multipart upload once stored, ranges ahead
    included: after the last byte the commit copies only what is left, and completes."""
    driver = _s3(swift, "early")
    data = os.urandom(4 * PIECE + 1234)
    dest, path = "blobs/sha256/ea/early", "uploads/sha256/early"
    writer = driver.open_partial(path, len(data), commit_to=dest)
    _write(writer, data[: 2 * PIECE])
    ahead = driver.open_extent(path, 3 * PIECE, len(data))  # a range of a parallel fill
    ahead.pwrite(data[3 * PIECE : 4 * PIECE], 0)
    assert _copied_parts(driver, dest, want=3) == [1, 2, 4]
    _write(writer, data[: 3 * PIECE], start=2 * PIECE)
    ahead.pwrite(data[4 * PIECE :], PIECE)
    ahead.flush()
    writer.settle(len(data))
    time.sleep(1)  # Swift logs a request when it ends
    before = len(swift.part_puts(driver.key(dest)))
    writer.commit(dest)
    time.sleep(1)
    assert driver.read(dest) == data
    # Part 3 (copied as its piece was stored, maybe still going) and 5 (the last piece, stored
    # by the range's flush) at most: the commit does not copy the whole blob again.
    assert len(swift.part_puts(driver.key(dest))[before:]) <= 2
    assert sorted(set(swift.part_puts(driver.key(dest)))) == [1, 2, 3, 4, 5]
    assert _open_uploads(driver, dest) == []
    assert driver.partial_size(path) is None


def test_a_fill_that_ends_without_its_commit_aborts_its_upload(swift):
    driver = _s3(swift, "abort")
    data = os.urandom(2 * PIECE + 10)
    dest, path = "blobs/sha256/ab/abort", "uploads/sha256/abort"
    writer = driver.open_partial(path, len(data), commit_to=dest)
    _write(writer, data)
    assert _copied_parts(driver, dest, want=2) == [1, 2]
    writer.truncate(0)  # upstream ignored a Range: the pieces are written again from 0
    assert _copied_parts(driver, dest, want=99, timeout=2) == []
    _write(writer, data[: PIECE + 5])
    assert _copied_parts(driver, dest, want=1) == [1]
    writer.close()  # the fill failed: its pieces stay for whoever resumes it
    assert _uploads_once_settled(driver, dest) == []
    assert driver.partial_size(path) == PIECE

    again = driver.open_partial(path, len(data), commit_to=dest)
    _write(again, data, start=PIECE)
    again.discard()
    assert _uploads_once_settled(driver, dest) == []
    assert driver.partial_size(path) is None


def test_a_commit_whose_upload_the_gc_aborted_begins_another(swift):
    """The GC aborts multipart uploads an hour old: a fill that long still commits."""
    driver = _s3(swift, "long")
    data = os.urandom(2 * PIECE + 99)
    dest, path = "blobs/sha256/lo/long", "uploads/sha256/long"
    writer = driver.open_partial(path, len(data), commit_to=dest)
    _write(writer, data)
    assert _copied_parts(driver, dest, want=2) == [1, 2]
    assert driver.abort_stale_multipart(0) == 1
    writer.commit(dest)
    assert driver.read(dest) == data
    assert _open_uploads(driver, dest) == []


def test_a_piece_is_stored_while_the_fill_goes_on(swift):
    """A piece's PUT runs beside the writes that follow (a parallel fill writes under one
    lock: a PUT in place held every range still); its bytes stay readable in the writer's
    process until stored, and a failed PUT is the writer's next call's error."""
    relay = StallingRelay(swift.ports["proxy"]).start()
    try:
        prefix = f"stall/{uuid.uuid4().hex}"
        client = s3_client(relay.url, ACCESS_KEY, SECRET_KEY, REGION)
        driver = S3Driver(client, SWIFT_BUCKET, prefix=prefix, part_size=PIECE)
        data = os.urandom(2 * PIECE + 100)
        path, dest = "uploads/sha256/stall", "blobs/sha256/st/stall"
        writer = driver.open_partial(path, len(data))
        _write(writer, data[: PIECE + 1000])
        # The first piece is whole, its PUT held at the store: pwrite came back all the same.
        deadline = time.monotonic() + 5
        while not relay.held and time.monotonic() < deadline:
            time.sleep(0.02)
        assert relay.held == 1
        assert writer.stored() == 0
        follower = driver.open_partial_read(path)
        assert follower.available() == PIECE + 1000
        assert follower.read_at(100, 1000) == data[100:1100]
        assert follower.read_at(PIECE, 500) == data[PIECE : PIECE + 500]
        relay.gate.set()
        _write(writer, data, start=PIECE + 1000)
        writer.commit(dest)
        follower.close()
        assert driver.read(dest) == data
    finally:
        relay.stop()

    tampering = TamperingRelay(swift.ports["proxy"]).start()
    try:
        client = s3_client(tampering.url, ACCESS_KEY, SECRET_KEY, REGION)
        driver = S3Driver(client, SWIFT_BUCKET, prefix=f"stall/{uuid.uuid4().hex}", part_size=PIECE)
        writer = driver.open_partial("uploads/sha256/bad", 2 * PIECE)
        _write(writer, data[:PIECE])  # its PUT fails at the store, after pwrite came back
        with pytest.raises(OSError, match="write"):
            _write(writer, data[: 2 * PIECE], start=PIECE)  # the next piece waits for it
        assert tampering.tampered >= 1
        writer.close()
    finally:
        tampering.stop()


def test_presigned_url_serves_the_object_with_range(swift):
    driver = S3Driver(swift.client(), SWIFT_BUCKET, prefix=f"presign/{uuid.uuid4().hex}")
    data = os.urandom(100_000)
    driver.write_atomic("blobs/x", data)
    url = driver.presign("blobs/x", 60)
    assert requests.get(url, timeout=10).content == data
    ranged = requests.get(url, headers={"Range": "bytes=10-19"}, timeout=10)
    assert ranged.status_code == 206 and ranged.content == data[10:20]


def test_unreachable_store_is_an_io_error_naming_it():
    from tests.support.servers import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    client = s3_client(endpoint, ACCESS_KEY, SECRET_KEY, REGION, connect_timeout=0.5)
    driver = S3Driver(client, SWIFT_BUCKET, endpoint=endpoint)
    started = time.monotonic()
    with pytest.raises(OSError) as caught:
        driver.stat("blobs/x")
    assert caught.value.errno == errno.EIO
    assert f"S3 bucket {SWIFT_BUCKET} at {endpoint}" in caught.value.strerror
    assert time.monotonic() - started < 15


def test_multipart_uploads_of_dead_commits_are_aborted(swift):
    prefix = f"multipart/{uuid.uuid4().hex}"
    driver = S3Driver(swift.client(), SWIFT_BUCKET, prefix=prefix)
    client = driver.client
    started = client.create_multipart_upload(Bucket=SWIFT_BUCKET, Key=f"{prefix}/blobs/x")
    assert driver.abort_stale_multipart(3600) == 0  # too young: its commit may be running
    assert driver.abort_stale_multipart(0) == 1
    left = client.list_multipart_uploads(Bucket=SWIFT_BUCKET, Prefix=prefix).get("Uploads", [])
    assert started["UploadId"] not in {u["UploadId"] for u in left}


def test_two_writers_of_one_fill_both_commit_the_same_blob(driver):
    """A lease lost in a Redis failover can leave two fetchers of one digest for a moment."""
    data = os.urandom(2 * PIECE + 77)
    first = driver.open_partial("uploads/sha256/twice", len(data))
    second = driver.open_partial("uploads/sha256/twice", len(data))
    _write(first, data)
    _write(second, data)
    first.commit("blobs/sha256/tw/twice")
    second.commit("blobs/sha256/tw/twice")
    assert driver.read("blobs/sha256/tw/twice") == data
    assert driver.partial_size("uploads/sha256/twice") is None
