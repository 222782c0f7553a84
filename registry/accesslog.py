"""The access log: one line per request, written straight to stderr.

A line per request is on the hot path (thousands a second per worker), and the logging
module's record, formatter and lock cost about a tenth of a cached manifest request. The
line keeps the logging module's shape and honours the `registry.access` logger's level
(`PULLTHROUGH_LOG_LEVEL=warning` turns it off), but is formatted once and written once,
with the timestamp string reused within a second.
"""

from __future__ import annotations

import logging
import os
import sys
import time

_logger = logging.getLogger("registry.access")
_stamp = (-1, "")


def write(message: str) -> None:
    global _stamp
    if not _logger.isEnabledFor(logging.INFO):
        return
    now = time.time()
    second = int(now)
    if _stamp[0] != second:
        _stamp = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
    millis = int((now - second) * 1000)
    sys.stderr.write(f"{_stamp[1]},{millis:03d} [{os.getpid()}] INFO registry.access {message}\n")
