"""The fill record `pt:fill:<digest>`: its type, its states and their transitions, written
once here. This module alone reads and writes that key (the schema:
registry/coordination/__init__.py).

A record is started (`FillRecords.begin`) by the request that holds the digest's fill lease,
the fetcher, which alone moves it on with a `FillWriter`:

    STARTING --> STREAMING --> COMMITTING --> COMMITTED
        |            |  ^           |
        +------------+--+-----------+--> FAILED

STREAMING repeats (progress); a takeover (a new lease holder: the fetcher died, or its read
broke mid-stream) starts a fresh record whatever the old one said. Followers in any process
read the record (`FillRecords.read`): the size before they send headers, how much is
stored, and why a fill failed (its error class, message, status-line cause, Retry-After).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
from redis.typing import EncodableT, FieldT

from registry.coordination.keys import text
from registry.numbers import count_or_none

PREFIX = "pt:"
RECORD_TTL = 3600
# While a fill runs its record lives this long (at least: 3 lease TTLs), refreshed with its
# lease: the record of a fill whose process died goes soon after, rather than saying
# `committing` or `streaming` with no fill behind it.
LIVE_TTL = 30
# A failed fill's record only has to reach the clients waiting on it: keep it briefly, so
# that requests for random digests do not leave an hour of records each.
FAILED_TTL = 120
# A failure Redis could not take (failing over) is written again this often, this many times.
RECORD_RETRY = 1.0
RECORD_ATTEMPTS = 15


class FillState(StrEnum):
    STARTING = "starting"
    STREAMING = "streaming"
    COMMITTING = "committing"
    COMMITTED = "committed"
    FAILED = "failed"


# What a fetcher may write after what (begin() writes STARTING over anything).
TRANSITIONS: dict[FillState, frozenset[FillState]] = {
    FillState.STARTING: frozenset({FillState.STREAMING, FillState.FAILED}),
    FillState.STREAMING: frozenset({FillState.STREAMING, FillState.COMMITTING, FillState.FAILED}),
    FillState.COMMITTING: frozenset({FillState.COMMITTED, FillState.FAILED}),
    FillState.COMMITTED: frozenset(),
    FillState.FAILED: frozenset(),
}


class FillPhase(StrEnum):
    """Where a failed fill was: before its first upstream byte, or mid-stream (resumable)."""

    STARTING = "starting"
    STREAMING = "streaming"


_STATES = frozenset(state.value for state in FillState)
_PHASES = frozenset(phase.value for phase in FillPhase)


class FailReason(StrEnum):
    """Why a fill failed; also the `reason` label of pullthrough_fill_failures_total."""

    DIGEST_MISMATCH = "digest_mismatch"  # never resumed: the same bytes would come again
    UPSTREAM_ERROR = "upstream_error"
    TIMEOUT = "timeout"
    STORAGE_ERROR = "storage_error"
    COORDINATION_ERROR = "coordination_error"  # Redis failed under the fill


_REASONS = frozenset(reason.value for reason in FailReason)


def _ranges(raw: str) -> tuple[tuple[int, int, int], ...]:
    """A parallel fill's segments as written by FillWriter.progress; () when malformed."""
    if not raw:
        return ()
    try:
        rows = json.loads(raw)
        return tuple((int(a), int(b), int(c)) for a, b, c in rows)
    except (ValueError, TypeError):
        return ()


class IllegalTransition(RuntimeError):
    """A fetcher tried to write a state the protocol does not allow after its current one."""


def record_key(digest: object) -> str:
    return f"{PREFIX}fill:{digest}"


@dataclass(frozen=True)
class FillRecord:
    """One read of `pt:fill:<digest>`; an empty record (no fill known) has state None."""

    state: FillState | None = None
    owner: str = ""
    repository: str = ""
    upstream: str = ""
    size: int | None = None
    written: int = 0
    stored: int | None = None  # bytes other processes can read (on S3: the stored pieces)
    reason: FailReason | None = None
    phase: FillPhase | None = None
    error_class: str = ""
    error_message: str = ""
    error_reason: str = ""  # the status line's cause
    retry_after: str = ""
    updated: float | None = None
    ranges: tuple[tuple[int, int, int], ...] = ()  # a parallel fill's (start, next, end)

    @classmethod
    def parse(cls, raw: Mapping[Any, Any]) -> FillRecord:
        data = {text(k): text(v) for k, v in raw.items()}
        state = data.get("state", "")
        phase = data.get("phase", "")
        reason = data.get("reason", "")
        try:
            updated = float(data["updated"]) if data.get("updated") else None
        except ValueError:
            updated = None
        return cls(
            state=FillState(state) if state in _STATES else None,
            owner=data.get("owner", ""),
            repository=data.get("repository", ""),
            upstream=data.get("upstream", ""),
            size=count_or_none(data.get("size")),
            written=count_or_none(data.get("written")) or 0,
            stored=count_or_none(data.get("stored")),
            reason=FailReason(reason) if reason in _REASONS else None,
            phase=FillPhase(phase) if phase in _PHASES else None,
            error_class=data.get("error_class", ""),
            error_message=data.get("error_message", ""),
            error_reason=data.get("error_reason", ""),
            retry_after=data.get("retry_after", ""),
            updated=updated,
            ranges=_ranges(data.get("ranges", "")),
        )

    @property
    def active(self) -> bool:
        """Bytes are flowing or being stored: a follower should wait, not take over."""
        return self.state in (FillState.STREAMING, FillState.COMMITTING)

    @property
    def resumable(self) -> bool:
        """Failed mid-stream for a reason another fetcher can resume from."""
        return (
            self.state is FillState.FAILED
            and self.phase is FillPhase.STREAMING
            and self.reason is not FailReason.DIGEST_MISMATCH
        )


@dataclass
class FillWriter:
    """The fetcher's handle on its record: each write checks the transition first."""

    records: FillRecords
    digest: object
    state: FillState = FillState.STARTING
    live_ttl: int = LIVE_TTL  # the record's TTL until the fill ends

    def _move(self, to: FillState, ttl: int | None = None, **fields: object) -> None:
        if to not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"fill of {self.digest}: {self.state.value} -> {to.value}")
        if to is not self.state:
            fields["state"] = to.value
        self.records.write(self.digest, ttl or self.live_ttl, **fields)
        self.state = to

    def touch(self) -> None:
        """The fill runs on (its lease was renewed): its record stays."""
        if self.state in (FillState.STARTING, FillState.STREAMING, FillState.COMMITTING):
            self.records.keep(self.digest, self.live_ttl)

    def streaming(self, size: int, written: int, upstream: str) -> None:
        self._move(FillState.STREAMING, size=size, written=written, upstream=upstream)

    def progress(self, written: int, stored: int, ranges: str | None = None) -> None:
        """`written`: bytes held in all; `stored`: the bytes in order followers can read;
        `ranges`: a parallel fill's segments as JSON `[[start, next byte, end], ...]`."""
        if ranges is None:
            self._move(FillState.STREAMING, written=written, stored=stored)
        else:
            self._move(FillState.STREAMING, written=written, stored=stored, ranges=ranges)

    def committing(self, size: int) -> None:
        self._move(FillState.COMMITTING, written=size, stored=size)

    def committed(self, size: int) -> None:
        self._move(FillState.COMMITTED, RECORD_TTL, size=size, written=size)

    def failed(
        self,
        reason: FailReason,
        phase: FillPhase,
        error_class: str,
        error_message: str,
        error_reason: str,
        retry_after: str,
    ) -> None:
        """The fill failed: its followers in every process learn it from here. Redis may be
        failing over as the fill ends: written again every RECORD_RETRY s, RECORD_ATTEMPTS
        times in all, so that the record does not go on saying `committing` (or streaming)
        with no fill behind it."""
        for attempt in range(RECORD_ATTEMPTS):
            try:
                self._move(
                    FillState.FAILED,
                    FAILED_TTL,
                    reason=reason.value,
                    phase=phase.value,
                    error_class=error_class,
                    error_message=error_message,
                    error_reason=error_reason,
                    retry_after=retry_after,
                )
                return
            except redis.RedisError:
                if attempt + 1 == RECORD_ATTEMPTS:
                    raise
                time.sleep(RECORD_RETRY)


class FillRecords:
    """The owner of `pt:fill:<digest>`."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def read(self, digest: object) -> FillRecord:
        return FillRecord.parse(self.redis.hgetall(record_key(digest)))

    def begin(
        self, digest: object, owner: str, repository: str, live_ttl: int = LIVE_TTL
    ) -> FillWriter:
        """A fresh record for the new lease holder, replacing whatever the last one said;
        it lives `live_ttl` unless written or touched again, until the fill ends."""
        key = record_key(digest)
        pipe = self.redis.pipeline()
        pipe.delete(key)
        pipe.hset(
            key,
            mapping={
                "owner": owner,
                "state": FillState.STARTING.value,
                "repository": repository,
                "size": "",
                "updated": f"{time.time():.3f}",
            },
        )
        pipe.expire(key, live_ttl)
        pipe.execute()
        return FillWriter(self, digest, live_ttl=live_ttl)

    def keep(self, digest: object, ttl: int) -> None:
        """The record lives `ttl` more seconds."""
        self.redis.expire(record_key(digest), ttl)

    def write(self, digest: object, ttl: int, **fields: object) -> None:
        key = record_key(digest)
        mapping: dict[FieldT, EncodableT] = {k: str(v) for k, v in fields.items()}
        mapping["updated"] = f"{time.time():.3f}"
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, ttl)
        pipe.execute()
