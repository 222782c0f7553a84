"""A cached manifest at the framework's floor: a WSGI layer in front of the Flask app that
answers a GET or HEAD of a manifest the cache holds fresh (ManifestPulls.cached: a tag within
its tag_ttl, a digest of the repository) with headers built once per manifest, and counts it
as the Flask route would: the access log line, the metrics, the Hosts table, the hourly
savings and the pull (api/v2.py count_manifest_answer, ManifestPulls.count_pull). Its
lookups are the route's own (on disk a stat of the tag file per request; on S3 a record
remembered while no tag moved, pullthrough/presence.py), so a tag another worker or node
moved or evicted is seen as the route would see it.

Everything else goes to Flask unchanged: another route or method, a query string (`?ns=`),
a host name server.hosts does not list, a name or reference Flask answers with an error, a
miss, a stale tag, a manifest under a signature policy, an Accept the manifest does not
satisfy.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import Any

from registry import accesslog
from registry.api.v2 import count_manifest_answer
from registry.clients import Clients, visit_of
from registry.hostnames import host_allowed
from registry.metrics import Metrics
from registry.names import Target, resolve, route_of
from registry.pullthrough.answers import Manifest
from registry.pullthrough.manifests import accepts, parse_accept
from registry.pullthrough.service import PullThrough

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict, StartResponse], Iterable[bytes]]

# Headers the app adds to every /v2/ answer (app.py's after_request): the same here.
COMMON = [
    ("Docker-Distribution-API-Version", "registry/2.0"),
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "sandbox"),
]
MEMO = 4096


@functools.lru_cache(maxsize=MEMO)
def _headers(digest: str, media_type: str, length: int) -> list[tuple[str, str]]:
    return [
        ("Content-Type", media_type),
        ("Content-Length", str(length)),
        ("Docker-Content-Digest", digest),
        ("ETag", f'"{digest}"'),
        ("X-Cache", "HIT"),
        *COMMON,
    ]


@functools.lru_cache(maxsize=256)
def _accept(header: str) -> list[str]:
    return parse_accept([header] if header else [])


class FastManifests:
    def __init__(
        self,
        flask: WsgiApp,
        pullthrough: PullThrough,
        metrics: Metrics,
        clients: Clients,
        allowed_hosts: Any,
    ) -> None:
        self.flask = flask
        self.pullthrough = pullthrough
        self.metrics = metrics
        self.clients = clients
        self.allowed_hosts = allowed_hosts

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        if (
            (method != "GET" and method != "HEAD")
            or not path.startswith("/v2/")
            or environ.get("QUERY_STRING")
        ):
            return self.flask(environ, start_response)
        name, found_sep, reference = path[4:].rpartition("/manifests/")
        if not found_sep or not name or not reference or "/" in reference:
            return self.flask(environ, start_response)
        if self.allowed_hosts and not host_allowed(self.allowed_hosts, environ.get("HTTP_HOST")):
            return self.flask(environ, start_response)
        started = time.monotonic()
        try:
            target = resolve(self.pullthrough.settings, name, None)
            found = self.pullthrough.cached(target, reference)
        except Exception:  # an invalid name, a store that fails: Flask answers, with its error
            found = None
        if found is None or not accepts(_accept(environ.get("HTTP_ACCEPT", "")), found.media_type):
            return self.flask(environ, start_response)
        self._count(environ, method, name, reference, target, found, started)
        digest = str(found.digest)
        start_response("200 OK", list(_headers(digest, found.media_type, len(found.body))))
        # One switch per request, as the Flask route's before_request (app.py): a keep-alive
        # connection's next request must not starve the worker's others.
        time.sleep(0)
        return [found.body] if method == "GET" else []

    def _count(
        self,
        environ: dict,
        method: str,
        name: str,
        reference: str,
        target: Target,
        found: Manifest,
        started: float,
    ) -> None:
        """What the Flask route records for a cached answer, in the same places."""
        registry = target.registry.name
        size = len(found.body) if method == "GET" else 0
        seconds = time.monotonic() - started
        self.pullthrough.count_pull(target, reference, found.digest)
        count_manifest_answer(
            self.pullthrough, self.metrics, method, registry, "hit", len(found.body), seconds
        )
        client = environ.get("REMOTE_ADDR")
        seen = visit_of(
            client,
            environ.get("HTTP_USER_AGENT", ""),
            route_of(name, None, target),
            "manifest",
            reference,
            environ.get("REMOTE_USER"),
        )
        self.clients.done(seen, 200, size, "hit", None)
        accesslog.request(
            client, method, registry, target.repository, reference, str(found.digest), None,
            200, size, seconds * 1000, "hit", None, environ.get("REMOTE_USER"),
        )  # fmt: skip
