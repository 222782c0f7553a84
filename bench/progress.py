"""Lines that say where a long run is, as it goes (`make bench` and `make soak` take minutes)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:7.1f} s] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def scenario(name: str) -> Iterator[None]:
    say(f"{name} ...")
    began = time.monotonic()
    try:
        yield
    except BaseException:
        say(f"{name} failed after {time.monotonic() - began:.1f} s")
        raise
    say(f"{name} done in {time.monotonic() - began:.1f} s")
