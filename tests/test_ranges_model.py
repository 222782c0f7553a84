"""A model of a parallel fill's storage (registry/pullthrough/ranges.py RangedUpload): a
hypothesis state machine writes the segments' chunks in any interleaving (the order in which
concurrent ranges happen to arrive), and kills the fetcher at any point (its RangedUpload is
dropped with whatever it had on disk, and a new one resumes from the upload and its extents,
as a takeover does), on the real filesystem store, with extents written into the upload in
place (user attributes mark its bytes in order) and as side files (a filesystem without them).

Checked after every step:
- what a follower of the upload may read (and a takeover resumes from) is the blob's first
  bytes, at least `prefix` of them, and the running hash is the hash of the first `prefix`
  (what clients are sent, and what is verified, is always the blob's prefix);
- every extent holds the blob's bytes at its offset, and none lies wholly in the prefix;
- no byte is asked of upstream twice (a resumed fill fetches only what nothing stored);
and at the end of the blob, after settle(), the digest matches and no extent is left.

Mutation-checked (test_the_model_catches): side bytes hashed but not copied into the upload,
a resume that ignores the extents, and a range written in place before the upload is marked.
"""

from __future__ import annotations

import hashlib
import os
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
from registry.pullthrough.fetch import _hash_prefix
from registry.pullthrough.ranges import RangedUpload
from registry.store import ContentStore, FilesystemDriver
from registry.store.partial_files import UploadExtent
from tests.conftest import model_examples

SIZE = 200_000
ALIGN = 4096
SMALLEST = 16 * 1024
WORKERS = 3


class RangedModel(RuleBasedStateMachine):
    workdir = None  # set by run_model
    in_place = True
    runs = 0

    @initialize(seed=st.integers(0, 2**16))
    def start(self, seed: int) -> None:
        RangedModel.runs += 1
        root = self.workdir / f"run-{RangedModel.runs}"
        self.store = ContentStore(FilesystemDriver(root, extents_in_place=self.in_place))
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
    def _upload_bytes(self) -> bytes:
        path = self.store.driver.local_path(self.store.upload_path(self.digest))
        return path.read_bytes() if path.exists() else b""

    @invariant()
    def followers_read_the_blobs_prefix_and_the_hash_is_the_prefixs(self) -> None:
        prefix = self.ranged.prefix
        on_disk = self._upload_bytes()
        follower = self.store.follow(self.digest, None)
        readable = follower.available() if follower else 0
        if follower:
            follower.close()
        assert readable == (self.store.upload_size(self.digest) or 0)
        assert readable >= prefix, "followers cannot read the bytes in order"
        assert on_disk[:readable] == self.data[:readable], "followers may read other bytes"
        if not self.in_place:
            assert len(on_disk) == prefix, "a side file's bytes are in the upload"
        expected = hashlib.sha256(self.data[:prefix]).hexdigest()
        assert self.ranged.hasher.copy().hexdigest() == expected, "the hash is not the prefix's"

    @invariant()
    def extents_hold_the_blobs_bytes_ahead_of_the_prefix(self) -> None:
        upload = self.store.upload_path(self.digest)
        for offset, size in self.store.upload_extents(self.digest):
            if self.in_place:
                held = self._upload_bytes()[offset : offset + size]
            else:
                held = self.store.driver.local_path(f"{upload}.{offset:016d}").read_bytes()
            assert held == self.data[offset : offset + size], "a wrong extent"
            assert offset + size > self.ranged.prefix, "an extent the prefix already holds"

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


def run_model(tmp_path, examples: int, in_place: bool) -> None:
    RangedModel.workdir = tmp_path
    RangedModel.in_place = in_place
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


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "side-files"])
def test_a_parallel_fills_storage_keeps_its_invariants(tmp_path, in_place):
    # make test's run; `make soak` runs the model longer (PULLTHROUGH_MODEL_EXAMPLES).
    run_model(tmp_path, examples=model_examples(50), in_place=in_place)


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


def _resume_ignoring_extents(self) -> None:
    """ranges.RangedUpload.adopt_extents, but the extents are forgotten (not deleted)."""


def _write_in_place_unmarked(self, data: bytes, offset: int, keep: bool = True) -> None:
    """partial_files.UploadExtent.pwrite, but the upload is not marked first."""
    os.pwrite(self.fd, data, self.offset + offset)
    self._end = max(self._end, self.offset + offset + len(data))


@pytest.mark.parametrize(
    ("owner", "name", "mutant", "in_place"),
    [
        (RangedUpload, "_absorb", _absorb_without_copying, False),
        (RangedUpload, "adopt_extents", _resume_ignoring_extents, True),
        (UploadExtent, "pwrite", _write_in_place_unmarked, True),
    ],
    ids=["side-bytes-not-copied", "resume-ignores-extents", "in-place-write-unmarked"],
)
def test_the_model_catches(tmp_path, monkeypatch, owner, name, mutant, in_place):
    monkeypatch.setattr(owner, name, mutant)
    with pytest.raises(AssertionError):
        run_model(tmp_path, examples=100, in_place=in_place)
