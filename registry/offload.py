"""CPU-heavy calls that release the GIL (hashing a chunk, copying a file range) run on a
real OS thread when gevent runs the process, so that the worker's other connections go on
being served on the other core meanwhile; elsewhere (tests, the CLI, rq) they run in place.

Under gunicorn's gevent workers every greenlet shares one OS thread: a fill's SHA-256 of a
1 GiB blob alone is most of a second of that thread, during which the clients streaming the
fill from the same worker wait.
"""

from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Below this a call costs less than the hand-off to a thread.
MIN_BYTES = 64 * 1024


def _threadpool() -> Any:
    gevent = sys.modules.get("gevent")
    if gevent is None:
        return None
    from gevent import monkey

    if not monkey.is_module_patched("threading"):
        return None
    return gevent.get_hub().threadpool


def offload(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args), on gevent's thread pool when gevent has patched this process (the calling
    greenlet waits; the others run)."""
    pool = _threadpool()
    if pool is None:
        return fn(*args)
    return pool.apply(fn, args)


def hash_update(hasher: Any, data: bytes) -> None:
    """hasher.update(data), off the gevent hub when it is worth it."""
    if len(data) < MIN_BYTES:
        hasher.update(data)
    else:
        offload(hasher.update, data)


def spawn(target: Callable[[], None], name: str) -> threading.Thread:
    """Run `target` in the background: a daemon thread, a greenlet under gevent (where a
    real thread is what offload() is for)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


class WriteBehind:
    """Calls that must run in order (the writes of one file, the updates of one hash),
    handed to a real thread of their own while the calling greenlet goes on (receiving the
    next bytes); at most `depth` wait. A failed call is raised by the next one, and by every
    one after it (the calls of several descriptors of one file may share one). Elsewhere
    than on a gevent hub's thread (no gevent, or a call from a thread of gevent's pool) a
    call runs in place.

    Writing into the page cache is not free: this machine's kernel spends 0.17-1.5 s per new
    GiB in pwrite (more where the pages were handed back to the host), which in place held
    the hub, and every client of the worker, still; waiting for each chunk's hash left the
    upstream socket unread."""

    def __init__(self, depth: int = 16) -> None:
        self.depth = depth
        self._pool = None
        self._owner = 0  # the native thread that made the pool (a hub's)
        self._pending: collections.deque = collections.deque()
        self._failure: BaseException | None = None

    def _collect(self) -> None:
        """The oldest call's outcome: its failure raised, and kept for every later call
        (the callers raise a kept one before they get here)."""
        try:
            self._pending.popleft().get()
        except BaseException as exc:
            self._failure = exc
            raise

    def _here(self) -> Any:
        """The pool, where this thread owns it; made on the first call from a hub's thread;
        None elsewhere (the call runs in place)."""
        if self._pool is not None:
            return self._pool if _native_ident() == self._owner else None
        if sys.modules.get("gevent") is None:
            return None
        from gevent._hub_local import get_hub_if_exists  # no public form of it
        from gevent.monkey import is_module_patched
        from gevent.threadpool import ThreadPool

        # Only a thread that runs a hub hands calls over: a first call from a thread of
        # gevent's pool must not make a hub of its own there.
        hub = get_hub_if_exists()
        if not is_module_patched("threading") or hub is None:
            return None
        if hub.thread_ident != _native_ident():
            return None
        self._owner = hub.thread_ident
        self._pool = ThreadPool(1)
        return self._pool

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        pool = self._here()
        if pool is None:
            fn(*args)
            return
        if self._failure is not None:
            raise self._failure
        self._pending.append(pool.spawn(fn, *args))
        while len(self._pending) > self.depth:
            self._collect()

    def wait(self) -> None:
        """Every call handed over is done (the first failure raised)."""
        if self._pool is None or _native_ident() != self._owner:
            return
        if self._failure is not None:
            raise self._failure
        while self._pending:
            self._collect()

    def close(self) -> None:
        """Wait for what was handed over, whatever it raises, and end the thread."""
        try:
            self.wait()
        except Exception:  # closing after a failure the caller already had (or will)
            self._pending.clear()
        self._failure = None
        if self._pool is not None and _native_ident() == self._owner:
            self._pool.kill()
            self._pool = None


def _native_ident() -> int:
    """The OS thread's id (threading's is a greenlet's once gevent has patched it). Only
    asked where gevent is loaded: by a WriteBehind, per call, so looked up once."""
    global _get_native_ident
    if _get_native_ident is None:
        from gevent.monkey import get_original

        _get_native_ident = get_original("_thread", "get_ident")
    return _get_native_ident()


_get_native_ident: Callable[[], int] | None = None
