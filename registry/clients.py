"""Who pulls through the cache: each /v2/ request's client as the Hosts page shows it (its
address, the engine and version its User-Agent names, the route its request took) and what
it got (a pull, the bytes that left, a hit or a miss, an error and its cause). The table
itself is coordination/hosts.py's; the counts by engine are /metrics'.

A pull is a manifest request by tag (GET or HEAD): every engine makes exactly one per
`pull name:tag`; a pull by digest shows in the requests only. The bytes are those of the
manifests and blobs that left (a download cut short counts as far as it went), not of
error bodies."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum

from registry.coordination.hosts import Hosts
from registry.metrics import Metrics
from registry.names import is_tag

MAX_AGENT = 80
MAX_VERSION = 40
# Cache results that answered from the cache (the hit ratio's numerator).
FROM_CACHE = frozenset(("hit", "revalidated", "stale"))


class Engine(StrEnum):
    """The engines told apart by their User-Agent (a bounded /metrics label)."""

    DOCKER = "docker"  # docker/20.10.24 go/... UpstreamClient(Docker-Client/...)
    CONTAINERD = "containerd"  # containerd/1.6.20: ctr, nerdctl, Kubernetes' kubelet (CRI)
    CONTAINERS_IMAGE = "containers-image"  # containers/5.23.1 (github.com/containers/image)
    SKOPEO = "skopeo"  # skopeo/1.9.3
    CRIO = "cri-o"  # cri-o/1.28.0 ...
    OTHER = "other"  # curl, a browser, a script


_PRODUCTS = {
    "docker": Engine.DOCKER,
    "containerd": Engine.CONTAINERD,
    "containers": Engine.CONTAINERS_IMAGE,
    "skopeo": Engine.SKOPEO,
    "cri-o": Engine.CRIO,
}


def _printable(text: str, limit: int) -> str:
    return "".join(c for c in text[:limit] if c.isprintable())


@functools.lru_cache(maxsize=512)
def engine_of(user_agent: str | None) -> tuple[Engine, str, str]:
    """The engine and version a User-Agent's first product token names, and the agent as
    shown: `docker/20.10.24+dfsg1 go/go1.19.8 ...` is (docker, 20.10.24+dfsg1, ...)."""
    first = (user_agent or "").strip().split(" ", 1)[0]
    product, _, version = first.partition("/")
    engine = _PRODUCTS.get(product.lower(), Engine.OTHER)
    if engine is Engine.CONTAINERD:
        version = version.removeprefix("v")
    return engine, _printable(version, MAX_VERSION), _printable(user_agent or "", MAX_AGENT)


@dataclass(slots=True)
class Visit:
    """A request's client and what kind of request it was, read in its context (a blob's
    figures are noted once its last byte has gone, after the context)."""

    address: str
    engine: Engine
    version: str
    agent: str
    route: str | None
    kind: str | None  # manifest | blob | None
    pull: bool
    user: str | None = None  # its login or client certificate's name (REMOTE_USER)


# The routes whose answers are image content, by Flask endpoint.
KINDS = {"v2.manifest": "manifest", "v2.blob": "blob"}


def visit_of(
    address: str | None,
    user_agent: str | None,
    route: str | None,
    kind: str | None,
    reference: str | None,
    user: str | None = None,
) -> Visit:
    """A request's Visit: its client, route and kind (manifest | blob | None), and whether
    it is a pull (a manifest asked for by tag)."""
    engine, version, agent = engine_of(user_agent)
    pull = kind == "manifest" and reference is not None and is_tag(reference)
    return Visit(address or "-", engine, version, agent, route, kind, pull, user)


def visit() -> Visit:
    """The current request's Visit (in a Flask request context)."""
    from flask import g, request

    return visit_of(
        request.remote_addr,
        request.headers.get("User-Agent", ""),
        g.get("route"),
        KINDS.get(request.endpoint or ""),
        g.get("reference"),
        request.environ.get("REMOTE_USER"),
    )


class Clients:
    """Notes each /v2/ request's client in the table and in /metrics."""

    def __init__(self, hosts: Hosts, metrics: Metrics | None) -> None:
        self.hosts = hosts
        self.metrics = metrics

    def done(
        self, seen: Visit, status: int, size: int, cache: str | None, cause: str | None
    ) -> None:
        """A request answered: `size` body bytes left, `cache` is how the cache answered
        (None for an error), `cause` the error's when status >= 400."""
        # Image content: manifests and blobs (an error's body is not counted).
        size = size if seen.kind is not None and status < 400 else 0
        counts = {"requests": 1, "bytes": size, "pulls": int(seen.pull and status < 400)}
        if cache is not None and status < 400 and seen.kind is not None:
            counts["answered"] = 1
            counts["hits"] = int(cache in FROM_CACHE)
        error = (status, cause or "") if status >= 400 else None
        self.hosts.note(
            seen.address, seen.engine, seen.version, seen.agent, seen.route, counts, error,
            seen.user,
        )  # fmt: skip
        if self.metrics is not None:
            self.metrics.client_sent(seen.engine, counts["pulls"], size)
