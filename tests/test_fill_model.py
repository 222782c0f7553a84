"""A model of the fill protocol: a hypothesis state machine drives fetchers and followers in
several simulated processes (threads, each with its own Coordination and BlobFiller, all on
one real Redis and one store) through fetchers killed mid-fill, reads broken mid-stream,
poisoned bytes, leases lapsing and slow Redis reads and writes, against a scripted upstream.

Checked whatever happens:
- a client only ever receives a prefix of the true blob, and its last byte only after the
  commit;
- at most one upstream GET is in flight at a time (single flight), and a follower never
  takes over a fill that failed on a digest mismatch (it would fetch the bad bytes again);
- every client ends with the whole blob or a RegistryError, never a short body without one,
  and never hangs;
- once the blob is committed, no partial file of it is left.

Mutation-checked (test_the_model_catches_*): the lease let go before a failure is recorded,
and the final byte sent before the commit, are each found within a few runs.

The model found a real race: a follower that read the lease free (between a broken fetch and
another follower's takeover) and the record late acted after that takeover had failed on its
digest, and fetched the bad bytes again. BlobFiller._try_fetch now checks a follower's
decision again under the lease, which also makes the order of the lease and record reads in
stream() harmless; that mutant (the check removed) needs a narrow interleaving that the
search reaches only sometimes, so it is not among the mutants checked here.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import random
import textwrap
import threading
import time

import pytest
import redis as redis_lib
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from registry.config import RegistrySettings
from registry.coordination import Coordination, Lease, blob_lease_key
from registry.coordination.fill_records import FillRecords, FillState
from registry.coordination.leases import Leases
from registry.digests import Digest
from registry.errors import RegistryError
from registry.names import Target
from registry.pullthrough.fetch import Fetcher
from registry.pullthrough.fill import BlobFiller
from registry.store import ContentStore, FilesystemDriver
from tests.conftest import model_examples

SIZE = 256 * 1024
CHUNK = 16 * 1024  # 16 chunks 20 ms apart: a fill lasts about 0.3 s
LEASE_TTL = 1.0
SLOW = 0.15  # a slow Redis answer
# Enough runs for the machine to find each mutant below (they take about a second each).
MUTANT_EXAMPLES = 80


class Killed(BaseException):
    """The process running this fill died (kill -9): nothing of it runs on."""


class ScriptedUpstream:
    """The upstream of every simulated process: what the next GETs do, and what happened."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.registry = RegistrySettings("docker.io", "http://scripted.invalid")
        self.script: list[str] = []
        self.gets: list[dict] = []  # mode, offset, start, end
        self.lock = threading.Lock()
        self.in_flight = 0
        self.overlaps = 0

    def view(self, proc: Proc) -> UpstreamView:
        return UpstreamView(self, proc)


class UpstreamView:
    """One process's client of the scripted upstream (so a 'kill' knows whom it kills)."""

    def __init__(self, upstream: ScriptedUpstream, proc: Proc) -> None:
        self.upstream = upstream
        self.proc = proc
        self.registry = upstream.registry

    def open_blob(self, repository: str, digest: str, offset: int = 0):
        up = self.upstream
        with up.lock:
            mode = up.script.pop(0) if up.script else "ok"
            get = {"mode": mode, "offset": offset, "start": time.monotonic(), "end": None}
            up.gets.append(get)
            up.in_flight += 1
            if up.in_flight > 1:
                up.overlaps += 1
        return Stream(up, self.proc, mode, offset, get)

    def blob_size(self, repository: str, digest: str) -> int:
        return len(self.upstream.data)


class Stream:
    def __init__(self, up: ScriptedUpstream, proc: Proc, mode: str, offset: int, get: dict):
        self.up, self.proc, self.mode, self.offset, self.get = up, proc, mode, offset, get
        self.total = len(up.data)
        self.closed = False

    def chunks(self):
        data = bytearray(self.up.data)
        if self.mode == "poison":
            data[-1] ^= 0xFF
        pos = self.offset
        while pos < len(data):
            if self.mode in ("break", "kill") and pos >= self.offset + len(data) // 3:
                if self.mode == "kill":
                    self.proc.die()
                    raise Killed()
                raise ConnectionResetError("the upstream connection was reset")
            if self.proc.killed:
                raise Killed()
            time.sleep(0.02)
            yield bytes(data[pos : pos + CHUNK])
            pos += CHUNK
        self.get["end"] = time.monotonic()  # the whole body is out (close() comes later)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with self.up.lock:
                self.up.in_flight -= 1
                self.get["end"] = self.get["end"] or time.monotonic()


class KillableLease(Lease):
    """A lease of a process that can die: a dead process neither renews nor releases."""

    def __init__(self, proc: Proc, *args) -> None:
        super().__init__(*args)
        self.proc = proc

    def renew(self) -> bool:
        return False if self.proc.killed else super().renew()

    def release(self) -> None:
        if not self.proc.killed:
            super().release()


class SlowFillRecords(FillRecords):
    """The fill records as one process sees them: its failure writes and its reads may be
    slow (the scheduler stalls it), stretching the windows between them."""

    def __init__(self, client, proc: Proc) -> None:
        super().__init__(client)
        self.proc = proc

    def write(self, digest, ttl, **fields) -> None:
        if fields.get("state") == FillState.FAILED.value and self.proc.slow_writes:
            time.sleep(SLOW)
        super().write(digest, ttl, **fields)

    def read(self, digest: Digest):
        record = super().read(digest)
        if self.proc.slow_reads:
            time.sleep(SLOW)
        return record


class KillableLeases(Leases):
    def __init__(self, client, owner: str, proc: Proc) -> None:
        super().__init__(client, LEASE_TTL, owner)
        self.proc = proc

    def blob(self, digest: Digest) -> Lease:
        return KillableLease(self.proc, self.redis, blob_lease_key(digest), LEASE_TTL, self.owner)


class ModelCoordination(Coordination):
    def __init__(self, client, proc: Proc) -> None:
        super().__init__(client, LEASE_TTL)
        self.leases = KillableLeases(client, self.owner, proc)
        self.fills = SlowFillRecords(client, proc)


class Proc:
    """One simulated process: its own Coordination and BlobFiller."""

    def __init__(self, model: FillModel, name: str) -> None:
        self.model = model
        self.name = name
        self.killed = False
        self.slow_reads = False
        self.slow_writes = False
        self.coord = ModelCoordination(model.redis, self)
        self.filler = BlobFiller(
            model.store, self.coord, start_timeout=8, stall_timeout=6, spawn=self.spawn,
            max_fills=1 << 30, max_fills_per_client=0, parallel_ranges=1,
            range_min_size=32 << 20,
        )  # fmt: skip
        self.upstream = model.upstream.view(self)
        original = self.filler._try_fetch

        def tracked_try_fetch(*args, **kwargs):
            caller = inspect.stack(0)[1].function
            took = original(*args, **kwargs)
            if took:
                model.fetches.append((caller, time.monotonic()))
            return took

        self.filler._try_fetch = tracked_try_fetch

    def spawn(self, target) -> threading.Thread:
        def run() -> None:
            with contextlib.suppress(Killed):
                target()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.model.threads.append(thread)
        return thread

    def die(self) -> None:
        self.killed = True


class FillModel(RuleBasedStateMachine):
    redis_url = ""
    workdir = None

    def __init__(self) -> None:
        super().__init__()
        self.redis = redis_lib.Redis.from_url(FillModel.redis_url)
        self.redis.flushall()
        seed = random.Random(len(FillModel.runs)).randbytes(SIZE)
        FillModel.runs.append(seed)
        self.data = seed
        self.digest = Digest("sha256", hashlib.sha256(seed).hexdigest())
        root = FillModel.workdir / f"run{len(FillModel.runs)}"
        self.store = ContentStore(FilesystemDriver(root))
        self.upstream = ScriptedUpstream(seed)
        self.target = Target(self.upstream.registry, "library/model")
        self.threads: list[threading.Thread] = []
        self.fetches: list[tuple[str, float]] = []
        self.clients: list[dict] = []
        self.violations: list[str] = []
        self.procs = [Proc(self, f"p{i}") for i in range(3)]

    runs: list = []

    # -- rules -----------------------------------------------------------------------------------
    @initialize(
        script=st.lists(st.sampled_from(["break", "poison", "kill", "ok"]), max_size=3),
        slow_reads=st.lists(st.booleans(), min_size=3, max_size=3),
        slow_writes=st.lists(st.booleans(), min_size=3, max_size=3),
    )
    def faults(self, script: list[str], slow_reads: list[bool], slow_writes: list[bool]) -> None:
        """What the upstream's GETs will do in turn (then: serve well), and which processes
        get slow answers from Redis."""
        self.upstream.script = list(script)
        for proc, reads, writes in zip(self.procs, slow_reads, slow_writes, strict=True):
            proc.slow_reads, proc.slow_writes = reads, writes

    @precondition(lambda self: len(self.clients) < 6)
    @rule(which=st.integers(0, 2))
    def client(self, which: int) -> None:
        proc = self.procs[which]
        if proc.killed:  # restarted, as it was configured
            reads, writes = proc.slow_reads, proc.slow_writes
            proc = self.procs[which] = Proc(self, f"{proc.name}'")
            proc.slow_reads, proc.slow_writes = reads, writes
        record: dict = {"proc": proc, "got": b"", "outcome": None}
        self.clients.append(record)
        thread = threading.Thread(target=self._run_client, args=(proc, record), daemon=True)
        thread.start()
        record["thread"] = thread

    @rule(seconds=st.sampled_from([0.02, 0.1, 0.3]))
    def wait(self, seconds: float) -> None:
        time.sleep(seconds)

    # -- a client --------------------------------------------------------------------------------
    def _run_client(self, proc: Proc, record: dict) -> None:
        filler, up = proc.filler, proc.upstream
        try:
            started = filler.start(self.target, up, self.digest)
            if started.committed:
                with self.store.open_blob(self.digest) as handle:
                    record["got"] = handle.read()
                record["outcome"] = "whole" if record["got"] == self.data else "wrong"
                return
            for chunk in filler.stream(self.target, up, self.digest, started.size, 0, SIZE - 1):
                if proc.killed:
                    record["outcome"] = "died"
                    return
                got = record["got"] = record["got"] + chunk
                if got != self.data[: len(got)]:
                    self.violations.append(f"{proc.name}: bytes that are not a prefix")
                if len(got) == SIZE and self.store.blob_size(self.digest) is None:
                    self.violations.append(f"{proc.name}: the last byte before the commit")
            whole = record["got"] == self.data
            record["outcome"] = "whole" if whole else "short without an error"
        except RegistryError as exc:
            record["outcome"] = "died" if proc.killed else f"error: {exc.message}"
        except Exception as exc:
            record["outcome"] = "died" if proc.killed else f"unexpected {type(exc).__name__}"

    # -- the end of each run ---------------------------------------------------------------------
    def teardown(self) -> None:
        try:
            self._check()
        finally:
            for proc in self.procs:
                proc.killed = True  # stop whatever still runs
            self.redis.close()

    def _check(self) -> None:
        for client in self.clients:
            client["thread"].join(timeout=30)
            assert not client["thread"].is_alive(), "a client hung"
        for thread in self.threads:
            thread.join(timeout=15)
        assert self.violations == [], self.violations
        for client in self.clients:
            outcome = client["outcome"]
            assert outcome == "whole" or outcome == "died" or outcome.startswith("error: "), outcome
        assert self.upstream.overlaps == 0, "two upstream GETs of one blob at once"
        poisoned = [g["end"] for g in self.upstream.gets if g["mode"] == "poison" and g["end"]]
        for caller, when in self.fetches:
            # A takeover of a fill whose bytes did not match its digest fetches them again.
            if caller == "stream" and any(0 <= when - end < 2 * SLOW + 0.5 for end in poisoned):
                raise AssertionError("a follower took over a fill that failed on its digest")
        if self.store.blob_size(self.digest) is not None:
            assert self.store.upload_size(self.digest) is None, "a partial left after commit"


def run_model(redis_server, tmp_path, examples: int, shrink: bool = True) -> None:
    """`examples` runs in a fixed order (seeded: derandomize), each at most 10 steps."""
    FillModel.redis_url = redis_server.url
    FillModel.workdir = tmp_path
    FillModel.runs = []
    run_state_machine_as_test(
        FillModel,
        settings=settings(
            max_examples=examples,
            stateful_step_count=10,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate, Phase.shrink] if shrink else [Phase.generate],
            report_multiple_bugs=False,
            suppress_health_check=list(HealthCheck),
        ),
    )


def test_the_fill_protocol_keeps_its_invariants(redis_server, tmp_path):
    # make test's run; `make soak` runs the model longer (PULLTHROUGH_MODEL_EXAMPLES).
    run_model(redis_server, tmp_path, examples=model_examples(12))


# -- mutants the model must catch ---------------------------------------------------------------
def assert_the_model_finds_a_violation(redis_server, tmp_path) -> None:
    """The machine fails on one of its invariants. A race found once may not come back when
    hypothesis replays the case (it then reports a FlakyFailure holding the failure)."""
    with pytest.raises(BaseException) as caught:
        run_model(redis_server, tmp_path, examples=MUTANT_EXAMPLES, shrink=False)
    error = caught.value
    if isinstance(error, BaseExceptionGroup):
        assert any(isinstance(e, AssertionError) for e in error.exceptions), error
    else:
        assert isinstance(error, AssertionError), error


def mutate(monkeypatch, name: str, old: str, new: str, owner: type = BlobFiller) -> None:
    """`owner.name` (BlobFiller's, or the Fetcher's) with `old` replaced by `new`."""
    module = inspect.getmodule(owner)
    source = textwrap.dedent(inspect.getsource(getattr(owner, name)))
    assert old in source, f"the mutant no longer applies to {owner.__name__}.{name}"
    namespace: dict = {}
    exec(compile(source.replace(old, new), module.__file__, "exec"), vars(module), namespace)
    monkeypatch.setattr(owner, name, namespace[name])


def test_the_model_catches_the_lease_let_go_before_the_failure_is_recorded(
    redis_server, tmp_path, monkeypatch
):
    mutate(
        monkeypatch,
        "run",
        "reason, error = self._classify(fill, exc)\n",
        "reason, error = self._classify(fill, exc)\n        lease.release()\n",
        owner=Fetcher,
    )
    assert_the_model_finds_a_violation(redis_server, tmp_path)


def test_the_model_catches_a_last_byte_sent_before_the_commit(redis_server, tmp_path, monkeypatch):
    mutate(
        monkeypatch,
        "stream",
        "limit = end + 1 if committed else min(end + 1, size - 1)",
        "limit = end + 1",
    )
    assert_the_model_finds_a_violation(redis_server, tmp_path)
