"""What a process remembers the store said exists (pullthrough/presence.py), on a real store
on disk with a real Redis and the real GC: reused while nothing was deleted, asked again after
a sweep deleted anything, including a sweep that ran while the question was being answered;
a tag's record reused while it is fresh and no tag moved."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import redis as redis_lib
from redis.backoff import NoBackoff
from redis.retry import Retry

from registry.config import GcSettings, RegistrySettings
from registry.coordination import Coordination
from registry.digests import Digest
from registry.gc import Collector
from registry.names import Target
from registry.pullthrough.presence import MISS_HOLD, Presence
from registry.store import ContentStore, FilesystemDriver, TagRecord

TARGET = Target(RegistrySettings("docker.io", "https://docker.io"), "library/p")


class CountingStore(ContentStore):
    """A real store on disk that counts the questions put to it, and can run something
    just after it answered one (a sweep racing the question)."""

    def __init__(self, root) -> None:
        super().__init__(FilesystemDriver(root))
        self.asked = 0
        self.tag_reads = 0
        self.revision_reads = 0
        self.after_answer = None
        self.while_asking = None

    def read_tag(self, target: Target, tag: str) -> TagRecord | None:
        self.tag_reads += 1
        return super().read_tag(target, tag)

    def manifest_media_type(self, target: Target, digest: Digest) -> str | None:
        self.revision_reads += 1
        return super().manifest_media_type(target, digest)

    def blob_size(self, digest: Digest) -> int | None:
        self.asked += 1
        if self.while_asking is not None:
            run, self.while_asking = self.while_asking, None
            run()
        size = super().blob_size(digest)
        if self.after_answer is not None:
            run, self.after_answer = self.after_answer, None
            run()
        return size


def nobody() -> redis_lib.Redis:
    """A Redis client with nothing at its address, that does not retry."""
    return redis_lib.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))


def orphan(store: ContentStore, data: bytes) -> Digest:
    """A blob no manifest names, written two days ago: the next sweep deletes it."""
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    store.put_verified_bytes(digest, data)
    path = store.driver.root / store.blob_path(digest)
    old = time.time() - 2 * 86400
    os.utime(path, (old, old))
    return digest


def sweep(store, coord) -> dict:
    return Collector(store, coord, GcSettings(delay=3600)).run()


def with_kept_blob(tmp_path, redis_client):
    """A counting store holding the 4-byte blob `kept`, and a Presence reusing for 60 s."""
    store = CountingStore(tmp_path / "data")
    coord = Coordination(redis_client, 5.0)
    kept = Digest.parse("sha256:" + hashlib.sha256(b"kept").hexdigest())
    store.put_verified_bytes(kept, b"kept")
    return store, coord, Presence(store, coord.deletions, coord.tag_moves, ttl=60), kept


def test_an_answer_is_reused_until_a_sweep_deletes_anything(tmp_path, redis_client):
    store, coord, presence, kept = with_kept_blob(tmp_path, redis_client)
    for _ in range(3):
        assert presence.asking().blob_size(kept) == 4
    assert store.asked == 1

    orphan(store, b"an orphan")  # another blob: the sweep deletes that one
    store.driver.touch(store.blob_path(kept))  # (and spares this one: it is recent)
    assert sweep(store, coord)["deleted_blobs"] == 1
    assert presence.asking().blob_size(kept) == 4
    assert store.asked == 2  # asked again: a deletion happened since


def test_a_sweep_racing_the_question_makes_the_answer_asked_again(tmp_path, redis_client):
    store = CountingStore(tmp_path / "data")
    coord = Coordination(redis_client, 5.0)
    presence = Presence(store, coord.deletions, coord.tag_moves, ttl=60)
    digest = orphan(store, b"deleted while the store answered")
    # The store answers "it exists", then the sweep deletes it before the answer is kept.
    store.after_answer = lambda: sweep(store, coord)
    assert presence.asking().blob_size(digest) == len(b"deleted while the store answered")
    assert store.blob_size(digest) is None  # the sweep did delete it
    assert presence.asking().blob_size(digest) is None  # not the remembered answer


def test_an_answer_lasts_at_most_ttl_and_nothing_is_reused_without_redis(tmp_path, redis_client):
    store = CountingStore(tmp_path / "data")
    coord = Coordination(redis_client, 5.0)
    now = [1000.0]
    presence = Presence(store, coord.deletions, coord.tag_moves, ttl=30, clock=lambda: now[0])
    digest = Digest.parse("sha256:" + hashlib.sha256(b"x").hexdigest())
    store.put_verified_bytes(digest, b"x")
    store.link_blob(TARGET, digest)
    assert presence.asking().blob_size(digest) == 1
    assert presence.asking().is_linked(TARGET, digest)
    now[0] += 29
    assert presence.asking().blob_size(digest) == 1 and store.asked == 1
    now[0] += 1
    assert presence.asking().blob_size(digest) == 1 and store.asked == 2

    # Redis away: no token to check an answer against, so the store answers each time.
    away = Coordination(nobody(), 5.0)
    blind = Presence(store, away.deletions, away.tag_moves, ttl=30)
    for _ in range(2):
        assert blind.asking().blob_size(digest) == 1
    assert store.asked == 4


def test_a_missing_blob_is_held_only_for_a_moment(tmp_path, redis_client):
    """A miss is the process's answer for MISS_HOLD (the requests of that moment go on to
    the fill, which sees a commit in its record), then the store is asked again."""
    now = [0.0]
    store = CountingStore(tmp_path / "data")
    coord = Coordination(redis_client, 5.0)
    presence = Presence(store, coord.deletions, coord.tag_moves, ttl=60, clock=lambda: now[0])
    digest = Digest.parse("sha256:" + hashlib.sha256(b"later").hexdigest())
    assert presence.asking().blob_size(digest) is None
    store.put_verified_bytes(digest, b"later")  # a fill committed it
    assert presence.asking().blob_size(digest) is None and store.asked == 1
    now[0] += MISS_HOLD
    assert presence.asking().blob_size(digest) == 5 and store.asked == 2


def test_requests_that_come_while_a_question_is_out_wait_for_its_answer(tmp_path, redis_client):
    store, coord, presence, kept = with_kept_blob(tmp_path, redis_client)
    orphan(store, b"an orphan")
    store.driver.touch(store.blob_path(kept))
    answers: list = []

    def later_request():
        answers.append(presence.asking().blob_size(kept))

    late = [threading.Thread(target=later_request) for _ in range(5)]

    def meanwhile():
        # While the first request's question is out: a sweep deletes something, then five
        # more requests (under the newer token) ask the same.
        assert sweep(store, coord)["deleted_blobs"] == 1
        for thread in late:
            thread.start()
        time.sleep(0.5)

    store.while_asking = meanwhile
    assert presence.asking().blob_size(kept) == 4
    for thread in late:
        thread.join()
    assert answers == [4] * 5 and store.asked == 1  # one question for the six requests
    # The answer predates the sweep: the five that waited for it did not remember it under
    # the token the sweep wrote, so the next request asks again.
    assert presence.asking().blob_size(kept) == 4
    assert store.asked == 2


def tagged(store: ContentStore, tag: str, validated: float) -> Digest:
    """A revision of TARGET (a manifest's digest and media type) and `tag` naming it."""
    body = f"manifest of {tag} at {validated}".encode()
    digest = Digest.parse("sha256:" + hashlib.sha256(body).hexdigest())
    store.put_verified_bytes(digest, body)
    store.put_manifest_revision(TARGET, digest, "application/vnd.oci.image.manifest.v1+json")
    store.write_tag(
        TARGET, tag, TagRecord(digest, "application/vnd.oci.image.manifest.v1+json", validated)
    )
    return digest


def remembering(tmp_path, redis_client):
    """A counting store on disk, and a Presence reusing for 60 s."""
    store = CountingStore(tmp_path / "data")
    coord = Coordination(redis_client, 5.0)
    return store, coord, Presence(store, coord.deletions, coord.tag_moves, ttl=60)


def test_a_tag_record_is_reused_while_fresh_until_a_tag_moves(tmp_path, redis_client):
    store, coord, presence = remembering(tmp_path, redis_client)
    first = tagged(store, "latest", 1000.0)
    for _ in range(3):
        assert presence.tag_record(TARGET, "latest", lambda r: True).digest == first
    assert store.tag_reads == 1

    # Another process moves the tag (writes its file, then the token).
    second = tagged(store, "latest", 2000.0)
    assert presence.tag_record(TARGET, "latest", lambda r: True).digest == first  # not told yet
    coord.tag_moves.happened()
    assert presence.tag_record(TARGET, "latest", lambda r: True).digest == second
    assert store.tag_reads == 2

    # A record past its tag_ttl is read again each time: another node may have revalidated it.
    for _ in range(2):
        assert presence.tag_record(TARGET, "latest", lambda r: False).digest == second
    assert store.tag_reads == 4


def test_a_tag_record_lasts_at_most_ttl_and_is_never_reused_without_redis(tmp_path, redis_client):
    store = CountingStore(tmp_path / "data")
    coord = Coordination(redis_client, 5.0)
    now = [0.0]
    presence = Presence(store, coord.deletions, coord.tag_moves, ttl=30, clock=lambda: now[0])
    tagged(store, "latest", 1000.0)
    presence.tag_record(TARGET, "latest", lambda r: True)
    now[0] += 29
    presence.tag_record(TARGET, "latest", lambda r: True)
    assert store.tag_reads == 1
    now[0] += 1
    presence.tag_record(TARGET, "latest", lambda r: True)
    assert store.tag_reads == 2

    away = Coordination(nobody(), 5.0)
    blind = Presence(store, away.deletions, away.tag_moves, ttl=30)
    for _ in range(2):
        blind.tag_record(TARGET, "latest", lambda r: True)
    assert store.tag_reads == 4


def test_a_revision_is_reused_until_anything_is_deleted(tmp_path, redis_client):
    store, coord, presence = remembering(tmp_path, redis_client)
    digest = tagged(store, "latest", 1000.0)
    for _ in range(3):
        assert presence.media_type(TARGET, digest) == "application/vnd.oci.image.manifest.v1+json"
    assert store.revision_reads == 1

    store.delete_revision(str(TARGET), digest)
    coord.deletions.happened()  # as admin evict and the GC's sweep do after deleting
    assert presence.media_type(TARGET, digest) is None
    assert presence.media_type(TARGET, digest) is None  # "it has none" is not remembered
    assert store.revision_reads == 3
