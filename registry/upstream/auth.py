"""Upstream authentication: `WWW-Authenticate` challenges and bearer tokens cached to expiry."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_PARAM = re.compile(r'([a-zA-Z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')

# A token is reused until this many seconds before it expires, so it never lapses in flight.
EXPIRY_MARGIN = 10.0
# The token spec's default lifetime when the token server does not say.
DEFAULT_EXPIRES_IN = 60.0
# The longest an upstream's `expires_in` is believed: a token kept longer than a day is kept
# past any revocation (and 1e999 is no number of seconds).
MAX_EXPIRES_IN = 86400.0
# Tokens kept per process: one per (upstream, repository scope, user). Past this the oldest
# go first, so a client asking for endless repository names cannot grow the process.
MAX_TOKENS = 4096


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lowercase
    params: dict[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    """Parse the first challenge of a `WWW-Authenticate` header."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


def token_expiry(value: object) -> float:
    """A token answer's `expires_in` (seconds; any JSON value) as a lifetime we trust: the
    spec's default when absent, not a positive number or not finite; at most MAX_EXPIRES_IN."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return DEFAULT_EXPIRES_IN
    try:
        seconds = float(value)
    except ValueError:
        return DEFAULT_EXPIRES_IN
    if not math.isfinite(seconds) or seconds <= 0:
        return DEFAULT_EXPIRES_IN
    return min(seconds, MAX_EXPIRES_IN)


def token_lifetime(expires_in: float) -> float:
    """How long to reuse a token that expires in `expires_in` seconds."""
    return max(expires_in - EXPIRY_MARGIN, expires_in / 2)


class TokenCache:
    """Bearer tokens per (service, scope, user), kept until shortly before they expire."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_tokens: int = MAX_TOKENS
    ) -> None:
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._max = max_tokens

    def get(self, key: tuple[str, ...]) -> str | None:
        with self._lock:
            entry = self._tokens.get(key)
            if entry is None:
                return None
            token, expires = entry
            if self._clock() >= expires:
                del self._tokens[key]
                return None
            return token

    def put(self, key: tuple[str, ...], token: str, expires_in: float) -> None:
        self.put_for(key, token, token_lifetime(expires_in))

    def put_for(self, key: tuple[str, ...], token: str, lifetime: float) -> None:
        """Keep `token` for exactly `lifetime` seconds."""
        with self._lock:
            self._tokens.pop(key, None)  # re-inserted last: dict order is age order
            self._tokens[key] = (token, self._clock() + lifetime)
            while len(self._tokens) > self._max:
                del self._tokens[next(iter(self._tokens))]
