"""Figures gathered in a process and written to Redis in batches: the hot request paths make
no Redis round trip for them (pulls, hourly savings, the Hosts table)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Flusher:
    """Calls `flush` every `every` seconds from a daemon thread (a greenlet under gevent)
    that runs only while something is gathered: `wake()` (with `lock` held) starts it, and
    it ends once a flush leaves `gathered()` false."""

    def __init__(
        self,
        flush: Callable[[], None],
        gathered: Callable[[], bool],
        lock: threading.Lock,
        every: float,
        name: str,
    ) -> None:
        self.flush = flush
        self.gathered = gathered
        self.lock = lock
        self.every = every
        self.name = name
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.every)
            self.flush()
            with self.lock:
                if not self.gathered():
                    self._thread = None  # the next gathered figure starts another
                    return
