"""The workers of a parallel range fill (ranges.py holds its plan and bookkeeping): each
takes the lowest segment nobody has, fetches it, asks again from its own next byte when it
breaks off, and takes the next; whether more than one range helps is measured first."""

from __future__ import annotations

import enum
import functools
import logging
import threading
import time
from collections.abc import Callable

from registry.errors import RegistryError, UpstreamError
from registry.pullthrough.ranges import LeaseLost, RangedUpload, Segment
from registry.upstream.client import BlobStream, UpstreamClient

log = logging.getLogger(__name__)

# How many times one range is asked for again after it broke off or stalled.
RANGE_ATTEMPTS = 3
PROGRESS_INTERVAL = 0.2
# Whether more ranges fetch faster is measured, not assumed: the first range runs alone
# for PROBE seconds from its first byte, then all of them for SPREAD_WINDOW seconds (once
# each has its first byte, or after SPREAD_PATIENCE); unless they got at least SPREAD_GAIN
# times the first range's rate (a link capped per connection: a CDN), the others finish the
# segment each has and the fill goes on as one stream. On a link that is one shared cap,
# more ranges only split it, and the bytes in order, which clients are sent, come slower.
PROBE = 0.5
SPREAD_WINDOW = 0.75
SPREAD_PATIENCE = 3.0
SPREAD_GAIN = 1.5
# How often the conductor looks (it sleeps between looks).
CONDUCT_TICK = 0.02


class Spread(enum.Enum):
    """What a parallel fill learned about its link (RangedCopy)."""

    PROBING = "probing"  # the first range alone, then all, measured
    SPREAD = "spread"  # more ranges fetch faster: all of them go on
    NARROWED = "narrowed"  # they did not: one stream goes on


class RangedCopy:
    """The workers of one parallel fill: each takes a segment, fetches it (asking again from
    its own next byte when it breaks off), and takes the next, until none is left or one
    fails for good; the first failure stops them all and is raised. The first worker (the
    one with the bytes in order) starts alone and the others only once measured
    to add throughput; when they do not, each finishes the segment it has and takes no
    other, and what nobody began is one request of the first worker's."""

    def __init__(
        self,
        ranged: RangedUpload,
        upstream: UpstreamClient,
        repository: str,
        *,
        workers: int,
        lease_lost: Callable[[], bool],
        report: Callable[[], None],
        spawn: Callable[[Callable[[], None]], threading.Thread],
    ) -> None:
        self.ranged = ranged
        self.spread = Spread.PROBING if workers > 1 else Spread.SPREAD
        self._started: set[int] = set()  # the workers that have had their first bytes
        self._first_done = False
        self._threads: list[threading.Thread] = []
        self.upstream = upstream
        self.repository = repository
        self.workers = workers
        self.lease_lost = lease_lost
        self.report = report
        self.spawn = spawn
        self.error: BaseException | None = None
        self._last_report = 0.0
        self._lock = threading.Lock()

    def run(self, first: BlobStream | None, first_segment: Segment | None) -> None:
        """Fetch every segment: the first through `first` (already open), in this thread
        with the others in their own (started at once, or by the conductor)."""
        conductor = None
        if self.spread is Spread.PROBING:
            conductor = self.spawn(self._conduct)
        else:
            self._start_others()
        self._worker(first, first_segment, 0)
        self._first_done = True  # the conductor stops looking
        if conductor is not None:
            conductor.join()
        for thread in self._threads:
            thread.join()
        if self.error is not None:
            raise self.error
        missing = [s for s in self.ranged.segments if not s.done]
        if missing:  # a worker ended without an error, yet bytes are missing: never commit
            raise UpstreamError(
                f"ranges of {self.ranged.digest} are missing after the fill",
                reason="upstream ranges went missing, not cached",
            )

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc

    def _start_others(self) -> None:
        for index in range(1, self.workers):
            self._threads.append(self.spawn(functools.partial(self._worker, None, None, index)))

    # -- measuring the link --------------------------------------------------------------------
    def _conduct(self) -> None:
        """The first range alone, then all, each measured: the others go on only where they
        add throughput (Spread)."""
        try:
            if not self._wait(lambda: 0 in self._started, None):
                return
            alone = self._measure(PROBE)
            if alone is None:
                return
            self._start_others()
            self._wait(lambda: len(self._started) >= self.workers, SPREAD_PATIENCE)
            spread = self._measure(SPREAD_WINDOW)
            if spread is None:
                return
            if spread >= SPREAD_GAIN * alone:
                self.spread = Spread.SPREAD
            else:
                self.spread = Spread.NARROWED
                # What nobody began is one segment again: one request for the rest.
                self.ranged.coalesce()
            log.info(
                "%d ranges of %s got %.1f MiB/s against %.1f MiB/s for one: %s",
                self.workers,
                self.ranged.digest,
                spread / (1 << 20),
                alone / (1 << 20),
                "all go on" if self.spread is Spread.SPREAD else "one stream goes on",
            )
        except BaseException as exc:
            self._fail(exc)

    def _over(self) -> bool:
        return self.error is not None or self._first_done

    def _wait(self, ready: Callable[[], bool], limit: float | None) -> bool:
        """Until `ready()` (True), the fill is over, or `limit` seconds passed (False)."""
        deadline = None if limit is None else time.monotonic() + limit
        while not ready():
            if self._over() or (deadline is not None and time.monotonic() >= deadline):
                return False
            time.sleep(CONDUCT_TICK)
        return True

    def _measure(self, seconds: float) -> float | None:
        """Bytes per second the fill gets over the next `seconds`; None if it ends first."""
        start, fetched = time.monotonic(), self.ranged.fetched
        self._wait(lambda: time.monotonic() - start >= seconds, None)
        if self._over():
            return None
        return (self.ranged.fetched - fetched) / max(time.monotonic() - start, 1e-3)

    # -- the workers ---------------------------------------------------------------------------
    def _take(self, index: int) -> Segment | None:
        """The next segment for worker `index`: none for the others once the fill narrowed
        (each finishes the one it has: closing a range's stream mid-way would waste what
        upstream already sent down it)."""
        if index and self.spread is Spread.NARROWED:
            return None
        return self.ranged.take()

    def _worker(
        self, stream: BlobStream | None = None, seg: Segment | None = None, index: int = 0
    ) -> None:
        try:
            while self.error is None:
                seg = seg or self._take(index)
                if seg is None:
                    return
                self._fetch(seg, stream, index)
                stream, seg = None, None
        except BaseException as exc:  # the fill classifies it
            self._fail(exc)
        finally:
            if stream is not None:
                stream.close()

    def _fetch(self, seg: Segment, stream: BlobStream | None, index: int) -> None:
        """The segment's bytes, asked for again from its next byte when a read breaks."""
        while not seg.done and self.error is None:
            broke: BaseException | None = None
            try:
                if stream is None:
                    stream = self._open(seg)
                broke = self._copy(seg, stream, index)
            except RegistryError as exc:  # the range's request was refused or failed
                broke = exc
            finally:
                if stream is not None:
                    stream.close()
                stream = None
            if not seg.done and self.error is None:
                self._retry(seg, broke or UpstreamError(f"range {seg.start} ended short"))

    def _retry(self, seg: Segment, exc: BaseException) -> None:
        seg.attempts += 1
        if seg.attempts > RANGE_ATTEMPTS:
            raise exc
        log.info(
            "range %d-%d of %s broke off at %d (%s); asking for the rest again",
            seg.start,
            seg.end - 1,
            self.ranged.digest,
            seg.pos,
            type(exc).__name__,
        )
        time.sleep(min(2.0, 0.25 * 2**seg.attempts))

    def _open(self, seg: Segment) -> BlobStream:
        stream = self.upstream.open_range(
            self.repository, str(self.ranged.digest), seg.pos, seg.end - 1, fallback=False
        )
        if not stream.ranged or stream.offset != seg.pos or stream.total != self.ranged.total:
            stream.close()
            raise UpstreamError(
                f"upstream {self.upstream.registry.name} stopped honouring Range for "
                f"{self.ranged.digest}",
                reason=f"{self.upstream.registry.name} stopped honouring Range, not cached",
            )
        return stream

    def _copy(self, seg: Segment, stream: BlobStream, index: int) -> BaseException | None:
        """The stream's bytes into the segment; what broke the read (a reset, a timeout), or
        None when it ended. Our own failures (the disk, a lost lease) are raised."""
        chunks = stream.chunks()
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                return None
            except Exception as exc:  # urllib3's resets, timeouts, protocol errors
                return exc
            if self.lease_lost():
                raise LeaseLost()
            if self.error is not None:
                return None
            self.ranged.write(seg, chunk)
            self._started.add(index)
            # Let the clients streaming this fill from the same gevent worker have a turn.
            time.sleep(0)
            now = time.monotonic()
            if now - self._last_report >= PROGRESS_INTERVAL:
                self._last_report = now
                self.report()
