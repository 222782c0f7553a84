"""The content store on disk: partial files and the start-up clean-up."""

from __future__ import annotations

import os
import time

from registry import create_app


def test_start_up_removes_partials_of_dead_fills_only(settings, redis_client):
    uploads = settings.storage_root / "uploads" / "sha256"
    uploads.mkdir(parents=True)
    dead, leased, fresh = "a" * 64, "b" * 64, "c" * 64
    for name in (dead, leased, fresh):
        (uploads / name).write_bytes(b"partial bytes")
    old = time.time() - 3600
    for name in (dead, leased):
        os.utime(uploads / name, (old, old))
    redis_client.set(f"pt:lease:blob:sha256:{leased}", "host:1:token", px=60_000)

    create_app(settings)

    assert not (uploads / dead).exists()  # no lease, old: left by a dead fill
    assert (uploads / leased).exists()  # a live fill owns it
    assert (uploads / fresh).exists()  # too recent to judge: its fill may be starting


def _sectors_written(path) -> int:
    """Sectors the block device under `path` has written since boot (its stat file)."""
    dev = os.stat(path).st_dev
    stat = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"
    assert os.path.exists(stat), f"{path} is on no block device ({stat}): nothing to measure"
    return int(open(stat).read().split()[6])


def test_a_fill_sends_its_bytes_to_the_disk_as_it_writes_them_not_at_its_commit(tmp_path):
    # The kernel would hold them for 30 s (dirty_expire) below its background threshold
    # (10% of memory): the commit's fdatasync then wrote all of them with the clients
    # waiting for the last byte (0.5 s of a 1 GiB fill).
    from registry.store.filesystem import WRITEBACK_STEP, FilesystemDriver

    driver = FilesystemDriver(tmp_path / "store")
    partial = driver.open_partial("uploads/sha256/" + "d" * 64)
    chunk = os.urandom(1 << 20)
    size = 8 * WRITEBACK_STEP
    before = _sectors_written(tmp_path)
    for offset in range(0, size, len(chunk)):
        partial.pwrite(chunk, offset)
    partial.flush()
    deadline = time.monotonic() + 10
    while (written := (_sectors_written(tmp_path) - before) * 512) < size - WRITEBACK_STEP:
        assert time.monotonic() < deadline, f"{written} of {size} bytes on the disk, no commit"
        time.sleep(0.05)
    partial.discard()
    partial.close()
