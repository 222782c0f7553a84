"""Single-flight blob fills: one upstream download per digest, however many clients ask.

The first request to miss takes the digest's Redis lease and starts a fill in the
background: one upstream read, written in order into the store's partial content for the
digest (`uploads/<algo>/<hex>`: a file on disk, pieces on S3), hashed as it streams,
committed in one step (a rename; on S3 a multipart copy) only when size and digest match.
Every client, the one that started the fill included, streams from that partial content as
it grows (on any node, when the store is shared), so a client that disconnects cancels
nothing. The final byte of every response is held back until
the commit, so a client never mistakes a torn or poisoned download for a good one.

A blob of at least `upstream.range_min_size` is fetched as several concurrent upstream
Range requests (ranges.py); the upload still only ever holds its bytes in order (on disk),
so followers read it alike.

If the fetcher dies (its lease lapses within `lease_ttl`) or its upstream read breaks, a
follower takes the lease and resumes from the bytes stored with an upstream Range request
(a parallel fill: only the ranges not stored), or restarts cleanly when upstream ignores
Range. The fill record `pt:fill:<digest>` carries
the size, progress (`stored`: what other processes can read) and failure reason for
followers in any process.

Here: who fetches (BlobFiller.start, the lease and the limits) and the reading side (every
client's stream of a fill). The fetching itself is fetch.py's (Fetcher).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, overload

from redis.exceptions import RedisError

from registry.coordination import Coordination
from registry.coordination.fill_records import (
    LIVE_TTL,
    FailReason,
    FillRecord,
    FillState,
)
from registry.digests import Digest
from registry.errors import (
    RECORDED_ERRORS,
    RegistryError,
    TooManyRequests,
    UpstreamError,
    UpstreamUnavailable,
)
from registry.metrics import Metrics
from registry.names import Target
from registry.offload import spawn as spawn_thread
from registry.pullthrough.fetch import READ_CHUNK, Fetcher, NodeCopy
from registry.store import ContentStore
from registry.store.driver import FileSpan, GrowingReader
from registry.upstream.client import UpstreamClient

log = logging.getLogger(__name__)

# A follower sends what the fill wrote once there is this much, or it waited MAX_HOLD.
MIN_SEND = 1024 * 1024
MAX_HOLD = 0.05
STATE_CHECK_INTERVAL = 0.1
# A fill in these states has all its bytes, and they hash to the digest.
VERIFIED = frozenset({FillState.COMMITTING, FillState.COMMITTED})
# A fill in these states, its lease held, has not committed the blob (or is about to say so).
RUNNING = frozenset({FillState.STARTING, FillState.STREAMING, FillState.COMMITTING})
MAX_TAKEOVERS = 3
# Retry-After of a fill refused because the cache runs as many as it may.
BUSY_RETRY = 5


def _held_and_running(holder: str | None, record: FillRecord) -> bool:
    # A holder yet to write its record (an older record names another owner) will write it
    # or let the lease go.
    return holder is not None and (record.owner != holder or record.state in RUNNING)


def _stored(record: FillRecord) -> int | None:
    # What a follower may read of a fill's upload, as its record says: nothing yet until
    # its first progress report; None (the follower looks for itself) when it is not
    # streaming or being committed.
    return (record.stored or 0) if record.active else None


@dataclass
class FillStart:
    """What a client needs before it can send headers: the blob's size."""

    size: int
    fetcher: bool = False  # this request started the fill (rather than joining one)
    committed: bool = False  # the blob is in the store already: serve it from there


class BlobFiller:
    def __init__(
        self,
        store: ContentStore,
        coordination: Coordination,
        *,
        start_timeout: float,
        stall_timeout: float,
        spawn: Callable[[Callable[[], None]], object] | None = None,
        metrics: Metrics | None = None,
        max_fills: int,
        max_fills_per_client: int,
        parallel_ranges: int,
        range_min_size: int,
        node_copy: Callable[[Digest, int, int], NodeCopy | None] | None = None,
    ) -> None:
        self.store = store
        self.coord = coordination
        self.start_timeout = start_timeout
        self.stall_timeout = stall_timeout
        self.spawn = spawn or functools.partial(spawn_thread, name="blob-fill")
        self.metrics = metrics
        self.max_fills = max_fills
        self.max_fills_per_client = max_fills_per_client
        self.fetcher = Fetcher(
            store,
            coordination,
            metrics=metrics,
            parallel_ranges=parallel_ranges,
            range_min_size=range_min_size,
            node_copy=node_copy,
        )

    # -- who fetches -----------------------------------------------------------------------------
    def _try_fetch(
        self,
        target: Target,
        upstream: UpstreamClient,
        digest: Digest,
        client: str | None = None,
        *,
        following: bool = False,
    ) -> str | None:
        """Take the lease and start a fill in the background: the lease's token (the owner
        its fill record names), or None when someone else holds it or the blob is in.
        Raises TooManyRequests when the fills running (in all, or of `client`) are at their
        limit: a `Range: bytes=0-0` and a hang-up still fetch the whole blob, so fills are
        what an unauthenticated client could pile up.

        `following`: the caller waited on a fill and decided, from what it read, to take it
        over. That read may be stale by now (a takeover may have come and failed on its
        digest since), so the decision is checked again under the lease: a fetcher records
        its failure before it lets the lease go, so the record read now is the last word, and
        a failure no fetch can mend is the follower's answer, not a reason to fetch again."""
        lease = self.coord.leases.blob(digest)
        if not lease.acquire():
            return None
        try:  # every way out but the spawned fill lets the lease go
            if self.store.blob_size(digest) is not None:
                # Committed between our look and the lease: the previous fetcher finished.
                lease.release()
                return None
            if following:
                record = self.coord.fills.read(digest)
                if record.state is FillState.FAILED and not record.resumable:
                    raise _error_from(record)
            refused = self.coord.limits.admit_fill(
                digest, client, self.max_fills, self.max_fills_per_client
            )
            if refused is not None:
                message = f"the cache is busy ({refused}); retry in {BUSY_RETRY} s"
                headers = {"Retry-After": str(BUSY_RETRY)}
                raise TooManyRequests(message, headers=headers, reason=message)
            live_ttl = max(LIVE_TTL, math.ceil(3 * lease.ttl))
            writer = self.coord.fills.begin(digest, lease.token, str(target), live_ttl)
        except BaseException:
            lease.release()
            raise
        self.spawn(lambda: self.fetcher.run(target, upstream, digest, lease, writer, client))
        return lease.token

    def start(
        self,
        target: Target,
        upstream: UpstreamClient,
        digest: Digest,
        client: str | None = None,
        *,
        asked: bool = False,
    ) -> FillStart:
        """Join or start the fill of `digest`; return its size once known.

        `committed` means the blob is in the store now (a fast fill may finish before this
        returns): serve it from there. `asked`: the caller has just found it missing from the
        store, which (where that is a request) is not asked again at once.
        """
        deadline = time.monotonic() + self.start_timeout
        seen_owner = None
        takeovers = 0
        fetcher = False
        sleep = 0.002
        remote = self.store.lookups_are_requests
        while True:
            # The lease before the state, as in stream(): a free lease is then never read
            # with a record that predates its fetcher's failure.
            holder = self.coord.leases.blob_holder(digest)
            record = self.coord.fills.read(digest)
            # Where a look at the store is a request (S3), a fill whose lease is held is not
            # asked about on every poll (a herd waiting for upstream's first answer sent the
            # bucket hundreds of HEADs): its record says when it is committed, and a holder
            # yet to write its record either will or lets the lease go.
            running = remote and _held_and_running(holder, record)
            # A fill that committed since the caller asked has said so in its record (before
            # its lease goes): only then is the caller's "missing" out of date.
            fresh = remote and asked and record.state is not FillState.COMMITTED
            asked = False
            if not running and not fresh and self.store.blob_size(digest) is not None:
                return FillStart(0, fetcher=fetcher, committed=True)
            if holder is not None:
                seen_owner = holder
            if record.owner and record.owner in (holder, seen_owner):
                if record.active and record.size:
                    return FillStart(record.size, fetcher=fetcher)
                if record.state is FillState.COMMITTED:
                    return FillStart(0, fetcher=fetcher, committed=True)
                if record.state is FillState.FAILED:
                    # Upstream said no, or sent wrong bytes: every waiting client hears it.
                    # A read that broke mid-stream is resumed instead, a bounded number of times.
                    takeovers += 1
                    if not record.resumable or takeovers > MAX_TAKEOVERS:
                        raise _error_from(record)
            # Nobody holds the lease: nothing started yet, or the fill we followed died or
            # failed mid-stream. Either way this request becomes the fetcher (or resumes it).
            if holder is None:
                token = self._try_fetch(
                    target, upstream, digest, client, following=seen_owner is not None
                )
                if token is not None:
                    # Ours now: a fill that fails before the next look (a 404 answers at
                    # once) is then still recognised as the one this request followed.
                    fetcher, seen_owner = True, token
                    continue
            if time.monotonic() > deadline:
                raise UpstreamUnavailable(
                    f"upstream {upstream.registry.name} did not start sending {digest} in time",
                    reason=f"{upstream.registry.name} did not start sending the blob in time",
                )
            time.sleep(sleep)
            sleep = min(sleep * 2, 0.05)

    def in_flight(self, digest: Digest) -> bool:
        """Whether a fill of `digest` holds its lease and has not committed, where a look at
        the store is a request (S3): a request for it then joins the fill without asking the
        bucket first, whose answer could only be "not yet". False when Redis does not
        answer: the store is asked, as without a fill."""
        return self._flight(digest) is not None

    def _flight(self, digest: Digest) -> FillRecord | None:
        """The record of the fill `in_flight` finds, or None."""
        if not self.store.lookups_are_requests:
            return None
        try:
            holder = self.coord.leases.blob_holder(digest)
            if holder is None:
                return None
            record = self.coord.fills.read(digest)
        except RedisError:
            return None
        return record if _held_and_running(holder, record) else None

    def _moved_on(self, digest: Digest, handle: GrowingReader) -> bool:
        record = self.coord.fills.read(digest)
        handle.expect(_stored(record))
        return not record.active or not self.coord.leases.blob_held(digest)

    @overload
    def stream(
        self,
        target: Target,
        upstream: UpstreamClient,
        digest: Digest,
        size: int,
        start: int,
        end: int,
        *,
        until_verified: bool = False,
        spans: Literal[False] = False,
    ) -> Iterator[bytes]: ...

    @overload
    def stream(
        self,
        target: Target,
        upstream: UpstreamClient,
        digest: Digest,
        size: int,
        start: int,
        end: int,
        *,
        until_verified: bool = False,
        spans: Literal[True],
    ) -> Iterator[bytes | FileSpan]: ...

    def stream(
        self,
        target: Target,
        upstream: UpstreamClient,
        digest: Digest,
        size: int,
        start: int,
        end: int,
        *,
        until_verified: bool = False,
        spans: bool = False,
    ) -> Iterator[bytes] | Iterator[bytes | FileSpan]:
        """Yield bytes [start, end] of the blob as the fill writes them; cut short on failure.
        The last byte waits for the commit; with `until_verified`, only for the fetcher to
        find that the bytes hash to the digest (for a reader that verifies and commits a copy
        of its own: a node's local tier, while the bucket's copy of the blob takes seconds).
        `spans`: where the fill is a local file, what is there as FileSpans of it, for the
        sender to sendfile (each span's `sent` says how far it got; the rest is offered
        again), never read into this process."""
        flight = self._flight(digest)
        handle = self.store.follow(digest, None, in_flight=flight is not None)
        poll = self.store.poll_interval
        remote = self.store.lookups_are_requests
        if flight is not None:
            # Not in the bucket yet (the record says when it is), and the pieces the record
            # says are stored need no HEAD to be found.
            committed = False
            if handle is not None:
                handle.expect(_stored(flight))
        else:
            committed = self.store.blob_size(digest) is not None
        pos = start
        takeovers = 0
        last_progress = time.monotonic()
        last_check = 0.0
        fill_written = 0
        sleep = 0.001
        held_since: float | None = None
        try:
            while pos <= end:
                # Hold back the final byte until the content is verified and committed.
                limit = end + 1 if committed else min(end + 1, size - 1)
                available = handle.available() if handle else 0
                ready = min(available, limit)
                if pos < ready and pos + MIN_SEND > ready < limit:
                    # A fill growing in small writes is sent in batches: a send of what just
                    # arrived costs every client a wake-up per few KiB. Held a moment only.
                    now = time.monotonic()
                    if held_since is None:
                        held_since = now
                    if now - held_since < MAX_HOLD:
                        time.sleep(MAX_HOLD / 10)
                        continue
                held_since = None
                if pos < ready:
                    assert handle is not None  # `ready` was read from it
                    fd = getattr(handle, "fd", None) if spans else None
                    if fd is not None:
                        span = FileSpan(fd, pos, ready - pos)
                        yield span
                        if span.sent:
                            pos += span.sent
                            last_progress = time.monotonic()
                            sleep = 0.001
                            continue
                    data = handle.read_at(pos, min(READ_CHUNK, ready - pos))
                    if data:
                        pos += len(data)
                        last_progress = time.monotonic()
                        sleep = 0.001
                        yield data
                        continue
                # Nothing to send: only now look at the store and Redis, never per chunk.
                # Where a look at the store is a request (S3), ask Redis first: how much the
                # fill has stored (the follower looks for new pieces only when there are
                # some), and whether it moved on (committed, failed, nobody's, forgotten).
                if not remote or handle is None or self._moved_on(digest, handle):
                    if not committed and self.store.blob_size(digest) is not None:
                        committed = True
                    followed = self.store.follow(digest, handle)
                    if followed is not handle:
                        handle = followed
                        if remote and handle is not None:
                            handle.expect(_stored(self.coord.fills.read(digest)))
                        continue
                now = time.monotonic()
                if now - last_check >= STATE_CHECK_INTERVAL:
                    last_check = now
                    # The lease before the state: a fetcher records its failure before it
                    # lets the lease go, so a free lease is never read with a stale
                    # 'streaming' state (which would take over, and refetch, bad bytes).
                    held = committed or self.coord.leases.blob_held(digest)
                    record = self.coord.fills.read(digest)
                    # Before the first byte these errors are the response (their class
                    # gives its status: 503 for our storage); after it they cut it short.
                    failed = record.state is FillState.FAILED
                    if failed and record.reason is FailReason.DIGEST_MISMATCH:
                        raise _error_from(record)
                    if until_verified and not committed and record.state in VERIFIED:
                        committed = True  # the bytes are the digest's; the commit may follow
                        continue
                    if not committed and not held:
                        if takeovers >= MAX_TAKEOVERS:
                            raise _error_from(
                                record,
                                f"fill of {digest} from upstream {upstream.registry.name} "
                                f"failed {takeovers} times; last: "
                                f"{record.error_message or 'no error recorded'}",
                            )
                        if self._try_fetch(target, upstream, digest, following=True):
                            takeovers += 1
                            log.info("took over the fill of %s at byte %d", digest, available)
                            last_progress = now
                    if record.state is FillState.COMMITTING and held:
                        last_progress = now  # the fetcher is alive, storing the blob
                    if held and record.active and record.written > fill_written:
                        # The fill is getting bytes, if not yet the ones in front of ours (a
                        # parallel fill's first range, slower than those ahead of it).
                        fill_written = record.written
                        last_progress = now
                    if now - last_progress > self.stall_timeout:
                        raise UpstreamUnavailable(
                            f"fill of {digest} from upstream {upstream.registry.name} stalled",
                            reason=f"{upstream.registry.name} stalled sending the blob",
                        )
                time.sleep(sleep)
                sleep = min(sleep * 2, poll)
        finally:
            if handle:
                handle.close()


def _error_from(record: FillRecord, message: str | None = None) -> RegistryError:
    """The failure a fill recorded, as its own class (and so status), maybe reworded."""
    cls = RECORDED_ERRORS.get(record.error_class, UpstreamError)
    headers = {"Retry-After": record.retry_after} if record.retry_after else None
    return cls(
        message or record.error_message or "fill failed",
        headers=headers,
        reason=record.error_reason or None,
    )
