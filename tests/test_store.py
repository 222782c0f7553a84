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
