"""What the store said exists, remembered by one process: a blob's size, and that a
repository has a blob linked. On S3 each answer is a bucket request (a HEAD: a round trip and
botocore's signing), and a warm blob GET asked two before its first byte; through a node's
local tier those were most of the gap to nginx serving the same file.

An answer is reused only while nothing was deleted from the store since it was given (the
`pt:deletions` token, coordination/deletions.py, read before asking: a deletion racing the
question rewrites it afterwards) and for at most `ttl` seconds, which bounds what a deletion
behind the cache's back (an operator, a bucket lifecycle rule) goes unseen. Only "it
exists" is remembered: a miss is a fill, whose commit must be seen at once. With `ttl` 0, or
when Redis does not answer, every question goes to the store.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from registry.coordination.deletions import Deletions
from registry.digests import Digest
from registry.names import Target
from registry.store import ContentStore

CAPACITY = 4096


class Presence:
    def __init__(
        self,
        store: ContentStore,
        deletions: Deletions,
        ttl: float,
        *,
        capacity: int = CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.deletions = deletions
        self.ttl = ttl
        self.capacity = capacity
        self.clock = clock
        # key -> (token, until, answer)
        self._known: OrderedDict[Hashable, tuple[str, float, int]] = OrderedDict()

    def asking(self) -> Asking:
        """The questions of one request: the token is read now, before any of them is put
        to the store."""
        return Asking(self, self.deletions.token() if self.ttl > 0 else None)

    def recall(self, key: Hashable, token: str | None) -> int | None:
        if token is None:
            return None
        entry = self._known.get(key)
        if entry is None:
            return None
        known_token, until, answer = entry
        if known_token != token or self.clock() >= until:
            del self._known[key]
            return None
        self._known.move_to_end(key)
        return answer

    def remember(self, key: Hashable, token: str | None, answer: int) -> None:
        if token is None:
            return
        self._known[key] = (token, self.clock() + self.ttl, answer)
        self._known.move_to_end(key)
        while len(self._known) > self.capacity:
            self._known.popitem(last=False)


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
        known = self.presence.recall(key, self.token)
        if known is not None:
            return known
        size = self.presence.store.blob_size(digest)
        if size is not None:
            self.presence.remember(key, self.token, size)
        return size

    def is_linked(self, target: Target, digest: Digest) -> bool:
        key = ("link", str(target), digest)
        if self.presence.recall(key, self.token) is not None:
            return True
        linked = self.presence.store.is_linked(target, digest)
        if linked:
            self.presence.remember(key, self.token, 1)
        return linked
