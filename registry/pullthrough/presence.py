"""What the store said exists, remembered by one process: a blob's size, and that a
repository has a blob linked. On S3 each answer is a bucket request (a HEAD: a round trip and
botocore's signing), and a warm blob GET asked two before its first byte; through a node's
local tier those were most of the gap to nginx serving the same file.

An answer is reused only while nothing was deleted from the store since it was given (the
`pt:deletions` token, coordination/deletions.py, read before asking: a deletion racing the
question rewrites it afterwards) and for at most `ttl` seconds, which bounds what a deletion
behind the cache's back (an operator, a bucket lifecycle rule) goes unseen. "It exists" is
remembered so; a blob's miss only for MISS_HOLD: the requests that come meanwhile go on to
the fill (fill.py), which asks the store again whenever no fill holds the blob's lease and
learns of a commit from the fill's record. Without it, every request that came after the
process's look and before the fill took its lease asked the bucket again, a window of
milliseconds that stretches with the machine's load. With `ttl` 0, or when Redis does not
answer, every question goes to the store.

Manifests are asked about on every request: a repository's revision of a digest (its media
type) is remembered as blobs are, while nothing was deleted; a tag's record while no tag moved
(the `pt:tag-moves` token, coordination/tag_moves.py, rewritten after a tag's file names
another digest or goes), while the record is fresh, for at most `ttl`. A cached manifest then
costs one Redis read and no bucket request.

With `ttl` above 0 a question is also put once at a time per process: requests that come
while the same one is out wait for its answer, rather than each asking the bucket about a
blob that a herd's first request is about to fill. Only the request that asked remembers the
answer, under its own token.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar, cast

from registry.coordination.deletions import Deletions
from registry.coordination.tag_moves import TagMoves
from registry.digests import Digest
from registry.names import Target
from registry.store import ContentStore, TagRecord

CAPACITY = 4096
# How long one process takes the store's "no such blob" as its answer (see above).
MISS_HOLD = 1.0

T = TypeVar("T")


class _Question:
    """A question to the store that one request is asking for every request of the process."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answered = False
        self.answer: object = None


class Presence:
    def __init__(
        self,
        store: ContentStore,
        deletions: Deletions,
        tag_moves: TagMoves,
        ttl: float,
        *,
        capacity: int = CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.deletions = deletions
        self.tag_moves = tag_moves
        self.ttl = ttl
        self._known = _Memo(capacity, clock)  # what exists, for ttl
        self._out: dict[Hashable, _Question] = {}  # questions being asked now
        self._missing = _Memo(capacity, clock)  # blobs the store said it lacks, MISS_HOLD
        self._lock = threading.Lock()

    def asking(self) -> Asking:
        """The questions of one request: the token is read now, before any of them is put
        to the store."""
        return Asking(self, self.deletions.token() if self.ttl > 0 else None)

    def tag_record(
        self, target: Target, tag: str, fresh: Callable[[TagRecord], bool]
    ) -> TagRecord | None:
        """The tag's record: the one this process last read, while no tag moved since, for at
        most ttl and while `fresh` holds for it; else the store's (remembered when there is
        one). The token is read before the store, so a move racing the read is seen next."""
        question = functools.partial(self.store.read_tag, target, tag)
        if self.ttl <= 0:
            return question()
        key = ("tag", str(target), tag)
        return self._reused(key, self.tag_moves.token(), question, fresh)

    def media_type(self, target: Target, digest: Digest) -> str | None:
        """The media type of the repository's revision of `digest`, None when it has none;
        that it has one is remembered while nothing was deleted, for at most ttl."""
        question = functools.partial(self.store.manifest_media_type, target, digest)
        if self.ttl <= 0:
            return question()
        key = ("revision", str(target), digest)
        return self._reused(key, self.deletions.token(), question, lambda _known: True)

    def _reused(
        self,
        key: Hashable,
        token: str | None,
        question: Callable[[], T | None],
        usable: Callable[[T], bool],
    ) -> T | None:
        """The answer remembered under `token` where `usable` says it still is, else the
        store's, remembered when there is one."""
        known = self._known.recall(key, token)
        if known is not UNKNOWN and usable(cast(T, known)):
            return cast(T, known)
        answer = question()
        if answer is not None:
            self._known.remember(key, token, self.ttl, answer)
        return answer

    def ask(self, key: Hashable, question: Callable[[], T]) -> tuple[T, bool]:
        """The store's answer to `question`, and whether this call asked it: a call made
        while the same question is out waits for that answer instead (ttl above 0). Asks
        itself if the one asking fails."""
        if self.ttl <= 0:
            return question(), True
        with self._lock:
            out = self._out.get(key)
            mine = out is None
            if mine:
                out = self._out[key] = _Question()
        assert out is not None
        if not mine:
            out.done.wait()
            if out.answered:
                return cast(T, out.answer), False
            return question(), True
        try:
            answer = question()
            out.answer, out.answered = answer, True
            return answer, True
        finally:
            with self._lock:
                del self._out[key]
            out.done.set()

    def recall(self, key: Hashable, token: str | None) -> int | None:
        answer = self._known.recall(key, token)
        return None if answer is UNKNOWN else cast(int, answer)

    def remember(self, key: Hashable, token: str | None, answer: int) -> None:
        self._known.remember(key, token, self.ttl, answer)

    def recently_missing(self, key: Hashable, token: str | None) -> bool:
        return self._missing.recall(key, token) is not UNKNOWN

    def remember_missing(self, key: Hashable, token: str | None) -> None:
        self._missing.remember(key, token, min(MISS_HOLD, self.ttl), None)


UNKNOWN = object()


class _Memo:
    """Answers kept under the deletion token they were given under, each until its time;
    the least recently used go past `capacity`. A `token` of None keeps and finds nothing."""

    def __init__(self, capacity: int, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.clock = clock
        self._items: OrderedDict[Hashable, tuple[str, float, object]] = OrderedDict()

    def recall(self, key: Hashable, token: str | None) -> object:
        """The answer kept for `key`, or UNKNOWN."""
        entry = self._items.get(key) if token is not None else None
        if entry is None:
            return UNKNOWN
        known_token, until, answer = entry
        if known_token != token or self.clock() >= until:
            self._items.pop(key, None)
            return UNKNOWN
        self._items.move_to_end(key)
        return answer

    def remember(self, key: Hashable, token: str | None, seconds: float, answer: object) -> None:
        if token is None:
            return
        self._items[key] = (token, self.clock() + seconds, answer)
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


class Asking:
    """One request's questions to the store, answered from memory where `token` allows
    (None: the store answers every one)."""

    def __init__(self, presence: Presence, token: str | None) -> None:
        self.presence = presence
        self.token = token

    def remembered_size(self, digest: Digest) -> int | None:
        """The blob's size if the store's word for it may be reused; the store is not asked."""
        return self.presence.recall(("blob", digest), self.token)

    def blob_size(self, digest: Digest) -> int | None:
        key = ("blob", digest)
        if self.presence.recently_missing(key, self.token):
            return None
        size = self._answer(key, lambda: self.presence.store.blob_size(digest))
        if size is None:
            self.presence.remember_missing(key, self.token)
        return size

    def is_linked(self, target: Target, digest: Digest) -> bool:
        key = ("link", str(target), digest)
        return bool(
            self._answer(key, lambda: 1 if self.presence.store.is_linked(target, digest) else None)
        )

    def _answer(self, key: Hashable, question: Callable[[], int | None]) -> int | None:
        """A remembered answer, else the store's (one question out at a time per process);
        "it exists" is remembered, by the request that asked only."""
        known = self.presence.recall(key, self.token)
        if known is not None:
            return known
        answer, asked = self.presence.ask(key, question)
        if answer is not None and asked:
            self.presence.remember(key, self.token, answer)
        return answer
