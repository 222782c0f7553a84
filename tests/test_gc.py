"""The GC: mark and sweep on a real store on disk with a real Redis; retention rules; the rq
worker in burst mode and the scheduler; a sweep killed with SIGKILL; property-based random
stores and random interleavings of fills, pulls and sweeps."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
import redis as redis_lib
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from registry.config import GcSettings
from registry.coordination import Coordination
from registry.digests import Digest
from registry.gc import Collector, GcBusy
from registry.store import ContentStore, FilesystemDriver
from tests.support.images import index, single
from tests.support.servers import run_module, start_module
from tests.support.stores import (
    age,
    blob_exists,
    cache_image,
    needed,
    random_image,
    raw_layer,
)

DAY = 86400.0


@pytest.fixture
def store(tmp_path):
    return ContentStore(FilesystemDriver(tmp_path / "data"))


@pytest.fixture
def coord(redis_client):
    return Coordination(redis_client, 5.0)


def collect(store, coord, *, later: float = 0.0, dry_run: bool = False, **policy) -> dict:
    """One run as if `later` seconds had passed since the files were written."""
    gc = GcSettings(**{"delay": DAY, **policy})
    return Collector(store, coord, gc, clock=lambda: time.time() + later).run(dry_run=dry_run)


def pull(store, coord, image, **kwargs) -> None:
    """What a pull of `image` by its tag leaves behind: the store filled, the pull recorded."""
    cache_image(store, image, **kwargs)
    if image.tag:
        coord.redis.zadd("pt:pulled", {f"docker.io/{image.repository}:{image.tag}": time.time()})


def all_files(store) -> list:
    return sorted(p for p in store.driver.root.rglob("*") if p.is_file())


def complete(store, image) -> bool:
    return all(blob_exists(store, d) for d in needed(image))


def pulled_at(coord, member: str, when: float) -> None:
    coord.redis.zadd("pt:pulled", {member: when})


def images_sharing_a_layer(seed: int = 1):
    rng = random.Random(seed)
    shared = raw_layer(rng, 5000)
    only = [raw_layer(rng, 7000 + i) for i in range(4)]
    a = random_image(rng, "library/a", "1", [shared, only[0]])
    b = random_image(rng, "library/b", "1", [shared, only[1]])
    c = random_image(rng, "library/c", "1", [shared, only[2]])
    return a, b, c, shared, only


# -- mark and sweep ---------------------------------------------------------------------------
def test_sweep_frees_what_no_tag_needs_and_keeps_every_tagged_image(store, coord):
    rng = random.Random(7)
    shared = raw_layer(rng, 4000)
    old = random_image(rng, "library/app", "latest", [shared, raw_layer(rng, 9000)])
    new = random_image(rng, "library/app", "latest", [shared, raw_layer(rng, 8000)])
    other = random_image(rng, "team/tool", "v1", [shared, raw_layer(rng, 3000)])
    for image in (old, new, other):  # the tag moved from `old` to `new`
        pull(store, coord, image)
    orphan = raw_layer(rng, 12345)
    store.put_verified_bytes(Digest.parse(orphan.digest), orphan.data)

    report = collect(store, coord, later=2 * DAY)

    assert complete(store, new) and complete(store, other)
    assert blob_exists(store, shared.digest)
    gone = (needed(old) - needed(new) - needed(other)) | {orphan.digest}
    assert not any(blob_exists(store, d) for d in gone)
    sizes = {d: len(data) for image in (old, new, other) for d, data in image.blobs.items()}
    sizes |= {orphan.digest: len(orphan.data), old.digest: len(old.manifest)}
    sizes |= {child.digest: len(child.manifest) for child in old.children}
    sizes |= {d: len(data) for child in old.children for d, data in child.blobs.items()}
    assert report["deleted_blobs"] == len(gone)
    assert report["freed_bytes"] == sum(sizes[d] for d in gone)
    assert report["deleted_tags"] == 0 and report["error"] == ""
    last = coord.gc.last()
    assert last["freed_bytes"] == str(report["freed_bytes"]) and last["dry_run"] == "False"


def test_content_younger_than_the_delay_is_never_deleted(store, coord):
    rng = random.Random(8)
    orphan = raw_layer(rng, 2000)
    store.put_verified_bytes(Digest.parse(orphan.digest), orphan.data)
    upload = store.driver.local_path("uploads/sha256/" + "ab" * 32)
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"partial")
    report = collect(store, coord, later=DAY / 2)
    assert report["deleted_blobs"] == 0 and report["deleted_uploads"] == 0
    assert blob_exists(store, orphan.digest) and upload.exists()
    collect(store, coord, later=DAY + 60)
    assert not blob_exists(store, orphan.digest) and not upload.exists()


def test_dry_run_deletes_nothing_and_predicts_the_real_run(store, coord):
    rng = random.Random(9)
    pool = [raw_layer(rng, 1000 + i) for i in range(6)]
    for i in range(6):
        pull(store, coord, random_image(rng, f"library/r{i % 3}", "1", pool))
    before = all_files(store)
    preview = collect(store, coord, later=3 * DAY, dry_run=True)
    assert all_files(store) == before
    assert coord.gc.last()["dry_run"] == "True"
    real = collect(store, coord, later=3 * DAY)
    for key in ("deleted_tags", "deleted_manifests", "deleted_blobs", "freed_bytes"):
        assert preview[key] == real[key], key
    assert real["deleted_manifests"] > 0  # three tags were overwritten


def test_a_blob_being_filled_or_downloaded_survives_the_sweep(store, coord):
    rng = random.Random(10)
    filling, reading = raw_layer(rng, 3000), raw_layer(rng, 300_000)
    for layer in (filling, reading):
        store.put_verified_bytes(Digest.parse(layer.digest), layer.data)
    partial = store.driver.local_path(store.upload_path(Digest.parse(raw_layer(rng, 10).digest)))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half")
    fill = coord.leases.blob(Digest.parse(filling.digest))
    assert fill.acquire()
    upload_fill = coord.leases.blob(Digest.parse("sha256:" + partial.name))
    assert upload_fill.acquire()
    download = store.open_blob(Digest.parse(reading.digest))  # a client mid-download
    first = download.read(1000)
    try:
        report = collect(store, coord, later=2 * DAY)
    finally:
        fill.release()
        upload_fill.release()
    assert blob_exists(store, filling.digest) and partial.exists()
    assert report["skipped_in_use"] == 1
    # The reader's blob was garbage and is gone from the store, but the client gets every byte.
    assert not blob_exists(store, reading.digest)
    assert first + download.read() == reading.data
    download.close()


def test_a_pull_during_the_sweep_keeps_what_it_referenced(store, coord, monkeypatch):
    rng = random.Random(11)
    layer = raw_layer(rng, 2000)
    store.put_verified_bytes(Digest.parse(layer.digest), layer.data)
    image = random_image(rng, "library/late", "1", [layer])
    original = Collector.plan

    def plan_then_pull(self, repos, blobs):
        planned = original(self, repos, blobs)
        # The mark is done: now a pull caches an image that needs the "unreferenced" layer.
        pull(store, coord, image)
        coord.gc.note_live(Digest.parse(d) for d in needed(image))
        return planned

    monkeypatch.setattr(Collector, "plan", plan_then_pull)
    report = collect(store, coord, later=2 * DAY)
    assert complete(store, image)
    assert report["skipped_in_use"] >= 1
    assert not coord.redis.exists("pt:gc:live")


def test_one_sweep_at_a_time(store, coord):
    lease = coord.gc.lease()
    assert lease.acquire()
    try:
        with pytest.raises(GcBusy):
            collect(store, coord)
    finally:
        lease.release()


def test_after_flushall_nothing_goes_for_lack_of_pull_history(store, coord):
    rng = random.Random(12)
    image = random_image(rng, "library/kept", "1", [raw_layer(rng, 1000)])
    pull(store, coord, image)
    coord.redis.flushall()
    collect(store, coord, later=30 * DAY, keep_pulled_within=7 * DAY)
    assert complete(store, image)
    # The run recorded "pulled now": a week later, unpulled, the tag does go.
    collect(store, coord, later=40 * DAY, keep_pulled_within=7 * DAY)
    assert not blob_exists(store, image.digest)


# -- retention ---------------------------------------------------------------------------------
def pulled_9_5_and_2_days_ago(store, coord, seed: int):
    """a, b and c cached and last pulled 9, 5 and 2 days before `now + 10 days`; the store's
    total bytes."""
    a, b, c, shared, _only = images_sharing_a_layer(seed)
    for image in (a, b, c):
        pull(store, coord, image)
    now = time.time() + 10 * DAY
    for member, days in (("a", 9), ("b", 5), ("c", 2)):
        pulled_at(coord, f"docker.io/library/{member}:1", now - days * DAY)
    return a, b, c, shared, sum(size for _, size, _ in store.iter_blobs())


def test_max_size_evicts_least_recently_pulled_images_and_keeps_shared_blobs(store, coord):
    a, b, c, shared, total = pulled_9_5_and_2_days_ago(store, coord, 1)
    exclusive_a = sum(store.blob_size(Digest.parse(d)) for d in needed(a) - needed(b) - needed(c))
    # Room for everything but a little less than a's own bytes: a goes, b and c stay.
    report = collect(store, coord, later=10 * DAY, max_size=total - 1, low_watermark=1.0)
    assert report["evicted"] == ["docker.io/library/a:1"]
    assert report["freed_bytes"] == exclusive_a
    assert complete(store, b) and complete(store, c) and blob_exists(store, shared.digest)
    assert not blob_exists(store, a.digest)
    assert store.read_tag_of("docker.io/library/a", "1") is None


def test_pinned_images_are_never_evicted(store, coord):
    a, _b, c, _shared, total = pulled_9_5_and_2_days_ago(store, coord, 2)
    report = collect(
        store,
        coord,
        later=10 * DAY,
        max_size=total - 1,
        low_watermark=1.0,
        pins=("docker.io/library/a:*",),
    )
    assert report["evicted"] == ["docker.io/library/b:1"]
    assert complete(store, a) and complete(store, c)


def test_tags_an_admin_pinned_are_never_evicted_nor_dropped(store, coord):
    a, _b, c, _shared, total = pulled_9_5_and_2_days_ago(store, coord, 2)
    store.pin("docker.io/library/a", "1")  # what POST /admin/pin does (tests/test_auth.py)
    report = collect(store, coord, later=10 * DAY, max_size=total - 1, low_watermark=1.0)
    assert report["evicted"] == ["docker.io/library/b:1"]
    assert complete(store, a) and complete(store, c)
    report = collect(store, coord, later=40 * DAY, keep_pulled_within=DAY)
    assert complete(store, a)  # pulled 39 days before, kept
    assert store.read_tag_of("docker.io/library/c", "1") is None


def test_keep_pulled_within_drops_tags_not_pulled_lately(store, coord):
    a, b, _c, shared, _only = images_sharing_a_layer(3)
    for image in (a, b):
        pull(store, coord, image)
    now = time.time() + 40 * DAY
    pulled_at(coord, "docker.io/library/a:1", now - 31 * DAY)
    pulled_at(coord, "docker.io/library/b:1", now - 3 * DAY)
    report = collect(store, coord, later=40 * DAY, keep_pulled_within=30 * DAY)
    assert report["deleted_tags"] == 1
    assert store.read_tag_of("docker.io/library/a", "1") is None
    assert complete(store, b) and blob_exists(store, shared.digest)
    assert not blob_exists(store, a.digest)
    # The emptied repository is gone from disk.
    assert not store.driver.local_path("repositories/docker.io/library/a").exists()


def test_index_children_cached_through_another_repository_stay_with_the_index(store, coord):
    rng = random.Random(13)
    amd = single("", "", [raw_layer(rng, 900)], arch="amd64")
    arm = single("", "", [raw_layer(rng, 800)], arch="arm64")
    in_a = index("library/a", "1", [amd, arm])
    in_b = index("library/b", "1", [amd])
    pull(store, coord, in_b)  # b's pull cached the amd64 child and its layers
    pull(store, coord, in_a, children=False)  # a reused them: no revision of the child in a
    now = time.time() + 40 * DAY
    pulled_at(coord, "docker.io/library/a:1", now - DAY)
    pulled_at(coord, "docker.io/library/b:1", now - 35 * DAY)
    collect(store, coord, later=40 * DAY, keep_pulled_within=30 * DAY)
    assert store.read_tag_of("docker.io/library/b", "1") is None
    assert complete(store, amd)  # what a pull of a:1 on amd64 reads
    assert blob_exists(store, in_a.digest)


# -- property-based: random stores -------------------------------------------------------------
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1), later_days=st.floats(0, 3))
def test_random_stores_lose_nothing_referenced_and_keep_nothing_old_unreferenced(
    tmp_path_factory, redis_server, seed, later_days
):
    client = redis_lib.Redis.from_url(redis_server.url)
    client.flushall()
    store = ContentStore(FilesystemDriver(tmp_path_factory.mktemp("gc-prop") / "data"))
    coord = Coordination(client, 5.0)
    rng = random.Random(seed)
    pool = [raw_layer(rng, rng.randint(10, 3000)) for _ in range(rng.randint(2, 12))]
    tagged: dict[tuple[str, str], object] = {}
    everything = set()
    for _ in range(rng.randint(1, 10)):
        repo, tag = f"library/r{rng.randint(0, 3)}", rng.choice(["1", "2", "latest"])
        image = random_image(rng, repo, tag, pool)
        pull(store, coord, image)
        client.zadd("pt:pulled", {f"docker.io/{repo}:{tag}": time.time()})
        tagged[(repo, tag)] = image  # a later image under the same tag replaces it
        everything |= needed(image)
    for _ in range(rng.randint(0, 4)):  # blobs nothing references
        orphan = raw_layer(rng, 100)
        store.put_verified_bytes(Digest.parse(orphan.digest), orphan.data)
        everything.add(orphan.digest)
    later = later_days * DAY
    collect(store, coord, later=later)

    kept = set().union(*(needed(image) for image in tagged.values()))
    for digest in kept:
        assert blob_exists(store, digest), "a blob a tagged image needs was deleted"
    for digest in everything - kept:
        assert blob_exists(store, digest) == (later < DAY), digest
    client.close()


# -- property-based: random interleavings of fills, pulls and sweeps ---------------------------
class Interleavings(RuleBasedStateMachine):
    """Fills cache images (some tags move), pulls refresh tags, the clock moves on, sweeps run
    under retention. Invariant: every tag still on disk has its whole image; once content is
    older than the delay and nothing keeps it, a sweep has removed it."""

    redis_url = ""
    workdir = None

    @initialize(seed=st.integers(0, 2**32 - 1))
    def setup(self, seed):
        self.client = redis_lib.Redis.from_url(self.redis_url)
        self.client.flushall()
        Interleavings.counter = getattr(Interleavings, "counter", 0) + 1
        root = self.workdir / f"run{Interleavings.counter}"
        self.store = ContentStore(FilesystemDriver(root))
        self.coord = Coordination(self.client, 5.0)
        self.rng = random.Random(seed)
        self.pool = [raw_layer(self.rng, self.rng.randint(10, 500)) for _ in range(8)]
        self.images: dict[str, object] = {}  # digest -> image

    def _collect(self, **policy):
        Collector(self.store, self.coord, GcSettings(delay=DAY, **policy)).run()

    @rule(repo=st.sampled_from(["library/x", "library/y", "team/z"]), tag=st.sampled_from("ab"))
    def fill(self, repo, tag):
        image = random_image(self.rng, repo, tag, self.pool)
        cache_image(self.store, image)
        self.coord.gc.note_live(Digest.parse(d) for d in needed(image))
        self.images[image.digest] = image
        self.coord.redis.zadd("pt:pulled", {f"docker.io/{repo}:{tag}": time.time()})

    @rule(data=st.data())
    def pull(self, data):
        tags = self._tags()
        if tags:
            repo, tag = data.draw(st.sampled_from(sorted(tags)))
            self.coord.redis.zadd("pt:pulled", {f"docker.io/{repo}:{tag}": time.time()})

    @rule(hours=st.integers(1, 60))
    def time_passes(self, hours):
        # Everything already written, and every pull recorded, gets `hours` older.
        for path in all_files(self.store):
            age(path, hours * 3600)
        pulls = self.coord.redis.zrange("pt:pulled", 0, -1, withscores=True)
        if pulls:
            self.coord.redis.zadd("pt:pulled", {m: t - hours * 3600 for m, t in pulls})

    @rule()
    def sweep(self):
        self._collect()

    @rule()
    def sweep_with_retention(self):
        self._collect(keep_pulled_within=2 * DAY, max_size=3000)

    def _tags(self) -> dict[tuple[str, str], str]:
        out = {}
        for repo, scan in self.store.scan_repositories().items():
            for tag in scan.tags:
                record = self.store.read_tag_of(repo, tag)
                out[(repo.removeprefix("docker.io/"), tag)] = str(record.digest)
        return out

    @invariant()
    def every_remaining_tag_is_whole(self):
        if not hasattr(self, "store"):
            return
        for (_repo, _tag), digest in self._tags().items():
            image = self.images[digest]
            for needed_digest in needed(image):
                assert blob_exists(self.store, needed_digest), "a kept tag lost a blob"

    def teardown(self):
        if hasattr(self, "client"):
            self.client.close()


def test_random_interleavings_of_fills_pulls_and_sweeps(tmp_path, redis_server, redis_client):
    Interleavings.redis_url = redis_server.url
    Interleavings.workdir = tmp_path
    run = Interleavings.TestCase
    run.settings = settings(max_examples=20, stateful_step_count=20, deadline=None)
    run("runTest").runTest()


# -- the rq worker, the scheduler, and a sweep killed mid-way ------------------------------------
@pytest.fixture
def config(tmp_path, redis_server, redis_client):
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {"storage": {"root": str(tmp_path / "data")}, "redis": {"url": redis_server.url}}
        )
    )
    return path


def workers(config, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_module("workers", config, *args, timeout=timeout)


def test_rq_worker_in_burst_mode_runs_an_enqueued_sweep(config, store, coord, redis_client):
    rng = random.Random(20)
    image = random_image(rng, "library/kept", "1", [raw_layer(rng, 1000)])
    pull(store, coord, image)
    orphan = raw_layer(rng, 5000)
    store.put_verified_bytes(Digest.parse(orphan.digest), orphan.data)
    age(store.driver.local_path(store.blob_path(Digest.parse(orphan.digest))), 2 * DAY)

    enqueued = json.loads(workers(config, "gc", "--enqueue").stdout)
    assert enqueued["queue"] == "pullthrough"
    assert redis_client.llen("rq:queue:pullthrough") == 1
    workers(config, "worker", "--burst")
    assert redis_client.llen("rq:queue:pullthrough") == 0
    assert not blob_exists(store, orphan.digest) and complete(store, image)
    last = {k.decode(): v.decode() for k, v in redis_client.hgetall("pt:gc:last").items()}
    assert last["deleted_blobs"] == "1" and last["freed_bytes"] == "5000"


def test_dry_run_from_the_command_line_prints_what_would_go(config, store):
    orphan = raw_layer(random.Random(21), 777)
    store.put_verified_bytes(Digest.parse(orphan.digest), orphan.data)
    age(store.driver.local_path(store.blob_path(Digest.parse(orphan.digest))), 2 * DAY)
    report = json.loads(workers(config, "gc", "--dry-run").stdout)
    assert report["dry_run"] is True
    assert report["deleted_blobs"] == 1 and report["freed_bytes"] == 777
    assert blob_exists(store, orphan.digest)


def test_several_schedulers_enqueue_one_sweep_per_interval(redis_client, tmp_path):
    from registry.config import Settings
    from workers.gc import JobScheduler

    settings_ = Settings(storage_root=tmp_path, gc=GcSettings(interval=3600))
    first, second = JobScheduler(redis_client, settings_), JobScheduler(redis_client, settings_)
    enqueued = first.enqueue_jobs() + second.enqueue_jobs()
    assert len(enqueued) == 1
    assert redis_client.llen("rq:queue:pullthrough") == 1
    # A scheduler (re)started within the interval does not enqueue another.
    assert JobScheduler(redis_client, settings_).enqueue_jobs() == []
    assert first.enqueue_jobs() == [] and second.enqueue_jobs() == []
    assert redis_client.llen("rq:queue:pullthrough") == 1


def test_a_sweep_killed_mid_way_leaves_a_consistent_store_and_the_next_run_finishes(
    config, store, coord, redis_client
):
    rng = random.Random(30)
    pool = [raw_layer(rng, 200) for _ in range(40)]
    kept = []
    for i in range(60):
        image = random_image(rng, f"library/r{i}", "1", pool)
        pull(store, coord, image)
        kept.append(image)
    for _ in range(3000):
        orphan = raw_layer(rng, 64)
        store.put_verified_bytes(Digest.parse(orphan.digest), orphan.data)
    for i in range(0, 60, 3):  # a third of the tags move: their old manifests are garbage
        moved = random_image(rng, f"library/r{i}", "1", pool)
        pull(store, coord, moved)
        kept[i] = moved
    for path in all_files(store):
        age(path, 2 * DAY)
    blobs_before = sum(1 for _ in store.iter_blobs())

    proc = start_module(
        "workers", config, "gc", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sum(1 for _ in store.iter_blobs()) < blobs_before - 500:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    remaining = sum(1 for _ in store.iter_blobs())
    assert remaining < blobs_before - 500, "the sweep was not caught mid-way"
    for image in kept:
        assert complete(store, image)
    for repo, scan in store.scan_repositories().items():
        for digest in scan.revisions:  # no manifest left without its body
            assert store.blob_size(digest) is not None, (repo, digest)

    # The dead sweep's lock lapses; the next run finishes the job.
    deadline = time.monotonic() + 40
    while redis_client.exists("pt:gc:lock") and time.monotonic() < deadline:
        time.sleep(0.5)
    workers(config, "gc")
    assert all(complete(store, image) for image in kept)
    wanted = set().union(*(needed(image) for image in kept))
    assert {str(d) for d, _, _ in store.iter_blobs()} == wanted


def test_the_worker_runs_no_job_that_pullthrough_did_not_enqueue(config, redis_client, tmp_path):
    """Whoever can write to Redis can write rq jobs: a pickled one (rq's default format), a
    JSON one naming another function, and pullthrough's own job or another with a success or
    failure callback (anything importable, here `print`) all fail without running anything;
    a sweep still runs."""
    from rq import Callback, Queue

    from workers.gc import QUEUE, queue, sweep

    pickled, named = tmp_path / "pickled-canary", tmp_path / "named-canary"
    pickled.write_text("x")
    named.write_text("x")
    Queue(QUEUE, connection=redis_client).enqueue(os.remove, str(pickled))  # rq's pickle
    queue(redis_client).enqueue(os.remove, str(named))  # JSON, but not a pullthrough job
    queue(redis_client).enqueue(
        sweep, kwargs={"dry_run": True}, job_id="success-canary", on_success=Callback(print)
    )
    queue(redis_client).enqueue(
        os.remove, str(named), job_id="failure-canary", on_failure=Callback(print)
    )
    workers(config, "gc", "--enqueue")
    ran = workers(config, "worker", "--burst")
    assert pickled.exists() and named.exists()
    assert "canary" not in ran.stdout  # neither callback was called
    assert redis_client.hget("pt:gc:last", "finished") is not None  # the real sweep ran
    failed = redis_client.zcard(f"rq:failed:{QUEUE}")
    assert failed == 4
