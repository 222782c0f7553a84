"""CPU-heavy calls that release the GIL (hashing a chunk, copying a file range) run on a
real OS thread when gevent runs the process, so that the worker's other connections go on
being served on the other core meanwhile; elsewhere (tests, the CLI, rq) they run in place.

Under gunicorn's gevent workers every greenlet shares one OS thread: a fill's SHA-256 of a
1 GiB blob alone is most of a second of that thread, during which the clients streaming the
fill from the same worker wait.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Below this a call costs less than the hand-off to a thread.
MIN_BYTES = 64 * 1024


def _threadpool():
    gevent = sys.modules.get("gevent")
    if gevent is None:
        return None
    from gevent import monkey

    if not monkey.is_module_patched("threading"):
        return None
    return gevent.get_hub().threadpool


def offload(fn: Callable[..., T], *args) -> T:
    """fn(*args), on gevent's thread pool when gevent has patched this process (the calling
    greenlet waits; the others run)."""
    pool = _threadpool()
    if pool is None:
        return fn(*args)
    return pool.apply(fn, args)


def hash_update(hasher, data: bytes) -> None:
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
