"""The cache's own logins: the users of the htpasswd file (bcrypt), reread when it changes,
and the bearer tokens its token endpoint issues, signed with the key every worker and node
shares (coordination/logins.py). registry/auth.py decides what they may do."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from redis.exceptions import RedisError

from registry.coordination.logins import Logins
from registry.store.filesystem import file_version

log = logging.getLogger("registry.auth")

# A password checked right is remembered this long (bcrypt costs ~0.1 s per check).
REMEMBER = 300.0
CHECK_EVERY = 1.0  # how often the htpasswd file is looked at for changes


class Users:
    """The htpasswd file's users (bcrypt hashes only), reread when it changes."""

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._version: tuple | None = None
        self._hashes: dict[str, bytes] = {}
        self._checked = -CHECK_EVERY
        # sha256(user, password, hash) of a right check -> when: a client sending Basic on
        # every request does not pay bcrypt each time; a changed hash no longer matches.
        self._right: dict[bytes, float] = {}
        self._decoy_hash: bytes | None = None
        self._reload()

    def _reload(self) -> None:
        if self.path is None:
            return
        now = self.clock()
        if now - self._checked < CHECK_EVERY:
            return
        with self._lock:
            self._checked = now
            try:
                version = file_version(self.path)
                if version == self._version:
                    return
                text = self.path.read_text()
            except OSError as exc:
                log.error("auth.htpasswd: cannot read %s (%s); keeping its users", self.path, exc)
                return
            hashes = {}
            for number, line in enumerate(text.splitlines(), 1):
                user, sep, hashed = line.strip().partition(":")
                if not line.strip() or line.startswith("#"):
                    continue
                if not sep or not hashed.startswith(("$2y$", "$2b$", "$2a$")):
                    log.warning(
                        "auth.htpasswd line %d: not user:bcrypt-hash (htpasswd -B); skipped",
                        number,
                    )
                    continue
                hashes[user] = hashed.encode()
            self._hashes, self._version = hashes, version

    def _decoy(self) -> bytes:
        """A hash of the file's own cost (its first user's), to check unknown users against."""
        import bcrypt

        cost = 5  # htpasswd -B's
        for hashed in self._hashes.values():
            cost = int(hashed.split(b"$")[2])
            break
        if self._decoy_hash is None or int(self._decoy_hash.split(b"$")[2]) != cost:
            self._decoy_hash = bcrypt.hashpw(b"decoy", bcrypt.gensalt(rounds=cost))
        return self._decoy_hash

    def check(self, user: str, password: str) -> bool:
        import bcrypt

        self._reload()
        # bcrypt reads the first 72 bytes (htpasswd -B hashes those): more is no error.
        secret = password.encode()[:72]
        hashed = self._hashes.get(user)
        if hashed is None:
            # As long as a wrong password: the time of the answer does not say who exists.
            bcrypt.checkpw(secret, self._decoy())
            return False
        seen = hashlib.sha256(b"\0".join((user.encode(), secret, hashed))).digest()
        now = self.clock()
        when = self._right.get(seen)
        if when is not None and now - when < REMEMBER:
            return True
        if not bcrypt.checkpw(secret, hashed):
            return False
        if len(self._right) > 10_000:
            self._right.clear()
        self._right[seen] = now
        return True


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tokens:
    """Bearer tokens this cache issues: `<payload>.<signature>`, the payload its user and
    expiry, signed with the shared key (HMAC-SHA256)."""

    def __init__(self, logins: Logins, ttl: int, clock: Callable[[], float] = time.time) -> None:
        self.logins = logins
        self.ttl = ttl
        self.clock = clock
        self._key: bytes | None = None
        self._read = 0.0

    def _signing_key(self, fresh: bool = False) -> bytes:
        # Read again when a token does not verify (a FLUSHALL made a new key), once a second.
        now = time.monotonic()
        if self._key is None or (fresh and now - self._read > 1.0):
            self._key, self._read = self.logins.signing_key(), now
        return self._key

    def _sign(self, payload: str, key: bytes) -> str:
        return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())

    def issue(self, user: str | None) -> str:
        payload = _b64(
            json.dumps({"sub": user or "", "exp": int(self.clock()) + self.ttl}).encode()
        )
        return f"{payload}.{self._sign(payload, self._signing_key())}"

    def user_of(self, token: str) -> str | None:
        """The token's user ("" for an anonymous one), or None when it is not one of ours
        or has expired."""
        payload, _, signature = token.partition(".")
        for fresh in (False, True):
            try:
                key = self._signing_key(fresh)
            except RedisError:
                return None  # no key to check it with: the client is asked to log in again
            if hmac.compare_digest(self._sign(payload, key), signature):
                break
        else:
            return None
        try:
            claims = json.loads(_unb64(payload))
        except (ValueError, binascii.Error):
            return None
        if not isinstance(claims, dict) or claims.get("exp", 0) < self.clock():
            return None
        return str(claims.get("sub", ""))
