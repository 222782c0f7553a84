"""`server.hosts`: the names this cache answers to (DNS rebinding: a web page cannot make a
browser talk to the cache under the page's own name).

An entry is `name` (any port), `name:port` (that port only) or `.domain` (every name under
it, any port); names compare case-insensitively. `/healthz` and `/readyz` answer under any
name, so a Kubernetes probe (which names the pod's IP) needs no entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# `host`, `host:port`, `[v6]`, `[v6]:port`.
_HOST = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?")
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True, slots=True)
class AllowedHost:
    name: str  # lowercase; `.domain` for a suffix
    port: int | None

    def admits(self, name: str, port: int | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.name.startswith("."):
            return name.endswith(self.name) or name == self.name[1:]
        return name == self.name


def split_host(value: str) -> tuple[str, int | None] | None:
    """(lowercase name, port or None) of a `Host` header or an entry; None if malformed."""
    match = _HOST.fullmatch(value.strip())
    if match is None:
        return None
    port = int(match.group(2)) if match.group(2) else None
    if port is not None and not 0 < port < 65536:
        return None
    return match.group(1).lower().rstrip("."), port


def parse_allowed(entries: tuple[str, ...]) -> tuple[AllowedHost, ...]:
    """The config's entries; ValueError naming one that is not a host name."""
    out = []
    for entry in entries:
        split = split_host(entry)
        if split is None:
            raise ValueError(f"{entry!r} is not a host name or host:port")
        out.append(AllowedHost(*split))
    return tuple(out)


def host_allowed(allowed: tuple[AllowedHost, ...], header: str | None) -> bool:
    split = split_host(header or "")
    if split is None:
        return False
    return any(entry.admits(*split) for entry in allowed)
