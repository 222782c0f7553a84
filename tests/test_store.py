"""The content store on disk: partial files and the start-up clean-up."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
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


KPF_DIRTY, KPF_WRITEBACK = 4, 8  # bits of /proc/kpageflags


def _dirty_pages(fd: int, offsets: range) -> list[int]:
    """The offsets of `fd` whose page cache page is dirty or being written: the kernel's own
    page flags (/proc/self/pagemap and /proc/kpageflags), read without writing anything."""
    view = mmap.mmap(fd, offsets.stop)
    anchor = ctypes.c_char.from_buffer(view)
    base = ctypes.addressof(anchor)
    dirty = []
    try:
        with open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as flags:
            for at in offsets:
                view[at]  # a read maps the page; it does not dirty it
                pagemap.seek((base + at) // mmap.PAGESIZE * 8)
                pfn = struct.unpack("<Q", pagemap.read(8))[0] & ((1 << 55) - 1)
                assert pfn, "no page frame numbers: reading them takes CAP_SYS_ADMIN"
                flags.seek(pfn * 8)
                if struct.unpack("<Q", flags.read(8))[0] & (1 << KPF_DIRTY | 1 << KPF_WRITEBACK):
                    dirty.append(at)
    finally:
        del anchor
        view.close()
    return dirty


def test_a_fill_sends_its_bytes_to_the_disk_as_it_writes_them_not_at_its_commit(tmp_path):
    # The kernel would hold them for 30 s (dirty_expire) below its background threshold
    # (10% of memory): the commit's fdatasync then wrote all of them with the clients
    # waiting for the last byte (0.5 s of a 1 GiB fill). The file's own pages tell, whatever
    # else the machine writes.
    from registry.store.filesystem import FilesystemDriver
    from registry.store.partial_files import WRITEBACK_STEP

    driver = FilesystemDriver(tmp_path / "store")
    partial = driver.open_partial("uploads/sha256/" + "d" * 64)
    chunk = os.urandom(1 << 20)
    size = 8 * WRITEBACK_STEP
    for offset in range(0, size, len(chunk)):
        partial.pwrite(chunk, offset)
    partial.flush()
    sent = range(0, size - WRITEBACK_STEP, 1 << 20)  # the last step may wait for the commit
    deadline = time.monotonic() + 10
    while dirty := _dirty_pages(partial.fd, sent):
        assert time.monotonic() < deadline, f"{len(dirty)} of {len(sent)} MiB still dirty"
        time.sleep(0.05)
    partial.discard()
    partial.close()
