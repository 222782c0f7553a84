"""A model of a parallel fill's storage (registry/pullthrough/ranges.py RangedUpload): a
hypothesis state machine writes the segments' chunks in any interleaving (the order in which
concurrent ranges happen to arrive), and kills the fetcher at any point (its RangedUpload is
dropped with whatever it had on disk, and a new one resumes from the upload and its side
files, as a takeover does), on the real filesystem store.

Checked after every step:
- the upload holds exactly the blob's first `prefix` bytes, and the running hash is the hash
  of those bytes (what clients are sent, and what is verified, is always the blob's prefix);
- every side file holds the blob's bytes at its offset, and none lies wholly in the prefix;
- no byte is asked of upstream twice (a resumed fill fetches only what nothing stored);
and at the end of the blob, after settle(), the digest matches and no side file is left.

Mutation-checked (test_the_model_catches_*): side bytes hashed but not copied into the upload,
and a resume that ignores the side files.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from registry.digests import Digest
from registry.pullthrough import ranges as ranges_module
from registry.pullthrough.fill import _hash_prefix
from registry.pullthrough.ranges import RangedUpload
from registry.store import ContentStore, FilesystemDriver

SIZE = 200_000
ALIGN = 4096
SMALLEST = 16 * 1024
WORKERS = 3


class RangedModel(RuleBasedStateMachine):
    workdir = None  # set by run_model
    runs = 0

    @initialize(seed=st.integers(0, 2**16))
    def start(self, seed: int) -> None:
        RangedModel.runs += 1
        root = self.workdir / f"run-{RangedModel.runs}"
        self.store = ContentStore(FilesystemDriver(root))
        self.data = random.Random(seed).randbytes(SIZE)
        self.digest = Digest.parse("sha256:" + hashlib.sha256(self.data).hexdigest())
        self.fetched = bytearray(SIZE)  # times each byte was asked of upstream
        upload = self.store.open_upload(self.digest, SIZE)
        self.ranged = RangedUpload(self.store, self.digest, upload, hashlib.sha256(), 0, SIZE)
        self.ranged.plan(0, WORKERS, SMALLEST, ALIGN)

    # -- what concurrent ranges do --------------------------------------------------------------
    @precondition(lambda self: any(not s.done for s in self.ranged.segments))
    @rule(pick=st.integers(0, 1000), length=st.sampled_from([1, 1000, 4096, 9000, 40_000]))
    def a_range_delivers_bytes(self, pick: int, length: int) -> None:
        pending = [s for s in self.ranged.segments if not s.done]
        seg = pending[pick % len(pending)]
        seg.taken = True
        end = min(seg.pos + length, seg.end)
        for at in range(seg.pos, end):
            self.fetched[at] += 1
        self.ranged.write(seg, self.data[seg.pos : end])

    @rule()
    def the_fetcher_dies_and_a_takeover_resumes(self) -> None:
        # Whatever was on disk stays; nothing in memory survives.
        self.ranged.close()
        self.ranged.upload.close()
        held = self.store.upload_size(self.digest) or 0
        upload = self.store.open_upload(self.digest, None)
        hasher = hashlib.sha256()
        held = _hash_prefix(upload, hasher, held)
        self.ranged = RangedUpload(self.store, self.digest, upload, hasher, held, SIZE)
        self.ranged.adopt_extents()
        self.ranged.plan(self.ranged.prefix, WORKERS, SMALLEST, ALIGN)

    # -- what must hold ---------------------------------------------------------------------------
    @invariant()
    def the_upload_is_the_blobs_prefix_and_so_is_the_hash(self) -> None:
        prefix = self.ranged.prefix
        path = self.store.driver.local_path(self.store.upload_path(self.digest))
        on_disk = path.read_bytes() if path.exists() else b""
        assert on_disk == self.data[:prefix], "the upload is not the blob's prefix"
        expected = hashlib.sha256(self.data[:prefix]).hexdigest()
        assert self.ranged.hasher.copy().hexdigest() == expected, "the hash is not the prefix's"

    @invariant()
    def side_files_hold_the_blobs_bytes_ahead_of_the_prefix(self) -> None:
        for offset, size in self.store.upload_extents(self.digest):
            path = self.store.driver.local_path(
                f"{self.store.upload_path(self.digest)}.{offset:016d}"
            )
            assert path.read_bytes() == self.data[offset : offset + size], "a wrong side file"
            assert offset + size > self.ranged.prefix, "a side file the prefix already holds"

    @invariant()
    def no_byte_is_asked_for_twice(self) -> None:
        assert max(self.fetched, default=0) <= 1, "a byte asked of upstream twice"

    def teardown(self) -> None:
        if getattr(self, "ranged", None) is None:
            return
        try:
            if all(s.done for s in self.ranged.segments):
                self.ranged.settle()
                assert self.ranged.prefix == SIZE
                assert self.ranged.hasher.hexdigest() == self.digest.hex
                assert self.store.upload_extents(self.digest) == []
        finally:
            self.ranged.close()
            self.ranged.upload.close()


def run_model(tmp_path, examples: int) -> None:
    RangedModel.workdir = tmp_path
    RangedModel.runs = 0
    run_state_machine_as_test(
        RangedModel,
        settings=settings(
            max_examples=examples,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate],
            report_multiple_bugs=False,
            suppress_health_check=list(HealthCheck),
        ),
    )


def test_a_parallel_fills_storage_keeps_its_invariants(tmp_path):
    run_model(tmp_path, examples=150)


# -- mutants the model must catch ---------------------------------------------------------------
def _absorb_without_copying(self) -> None:
    """ranges.RangedUpload._absorb, but the side bytes are only hashed, never copied in."""
    for seg in self.segments:
        if seg.side is None or not seg.side_start <= self.prefix < seg.pos:
            continue
        data = seg.side.read_range(self.prefix - seg.side_start, seg.pos - self.prefix)
        self.hasher.update(data)
        self.prefix += len(data)
        self.main_end = self.prefix
        seg.side.discard()
        seg.side.close()
        seg.side = None
        seg.main = not seg.done


def _resume_ignoring_side_files(self) -> None:
    """ranges.RangedUpload.adopt_extents, but the extents are forgotten (not deleted)."""


@pytest.mark.parametrize(
    ("name", "mutant"),
    [("_absorb", _absorb_without_copying), ("adopt_extents", _resume_ignoring_side_files)],
    ids=["side-bytes-not-copied", "resume-ignores-side-files"],
)
def test_the_model_catches(tmp_path, monkeypatch, name, mutant):
    monkeypatch.setattr(ranges_module.RangedUpload, name, mutant)
    with pytest.raises(AssertionError):
        run_model(tmp_path, examples=150)
