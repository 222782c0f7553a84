"""The app and the one place that wires the services together: `create_app(settings)`."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any

import redis
import requests
from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_flask_exporter import PrometheusMetrics
from requests.adapters import HTTPAdapter
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from registry import accesslog, logs
from registry.api import health, v2
from registry.api.admin import bp as admin_bp
from registry.api.fast import FastManifests
from registry.auth import Guard
from registry.clients import Clients, visit
from registry.config import Settings, config_warnings, load_settings
from registry.coordination import Coordination, connect, redis_address
from registry.coordination.tokens import SharedTokenCache
from registry.coordination.upstream_health import UpstreamHealth
from registry.digests import Digest, looks_like_digest
from registry.errors import (
    HostNotAllowed,
    NotFound,
    RegistryError,
    Unsupported,
    error_response,
    redis_unavailable,
    storage_failure,
)
from registry.gc import Collector
from registry.hostnames import OPEN_PATHS, host_allowed, parse_allowed
from registry.metrics import Metrics, scrape
from registry.names import catalog_name
from registry.pullthrough.service import PullThrough
from registry.store import ContentStore, FilesystemDriver, StorageDriver
from registry.store.tier import LocalTier
from registry.tls import identified
from registry.ui.views import bp as ui_bp
from registry.upstream.client import UpstreamClient

log = logging.getLogger("registry")

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


def upstream_session(pool_size: int = 64) -> requests.Session:
    """One pooled HTTP session per process, shared by every upstream client."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "pullthrough/0.1"
    # Upstream answers are byte-exact content: never let requests read proxies from .netrc.
    session.trust_env = False
    return session


# S3 answers a CompleteMultipartUpload of a large object only when it is done (minutes).
COMMIT_READ_TIMEOUT = 600.0


def storage_driver(settings: Settings) -> StorageDriver:
    """The configured storage: a directory, or an S3 bucket."""
    s3 = settings.s3
    if s3 is None:
        return FilesystemDriver(settings.storage_root, settings.storage_file_mode)
    from registry.store.s3 import S3Driver, s3_client

    def client(read_timeout: float) -> Any:
        return s3_client(
            s3.endpoint,
            s3.access_key,
            s3.secret_key,
            s3.region,
            path_style=s3.path_style,
            verify=s3.tls_verify,
            connect_timeout=settings.upstream.connect_timeout,
            read_timeout=read_timeout,
        )

    return S3Driver(
        client(settings.upstream.read_timeout),
        s3.bucket,
        prefix=s3.prefix,
        part_size=s3.part_size,
        endpoint=s3.endpoint or "",
        commit_client=client(max(COMMIT_READ_TIMEOUT, settings.upstream.read_timeout)),
    )


def build_pullthrough(
    settings: Settings, redis_client: redis.Redis | None = None, metrics: Metrics | None = None
) -> PullThrough:
    """The services behind the app, wired together (also used by the CLI and workers)."""
    store = ContentStore(storage_driver(settings))
    client = redis_client or connect(
        settings, socket_timeout=5, connect_timeout=2, health_check_interval=30
    )
    coordination = Coordination(client, settings.upstream.lease_ttl, hosts_max=settings.hosts.max)
    session = upstream_session()
    tokens = SharedTokenCache(client)
    upstreams = {
        registry.name: UpstreamClient(
            registry,
            session,
            connect_timeout=settings.upstream.connect_timeout,
            read_timeout=settings.upstream.read_timeout,
            metadata_timeout=settings.upstream.small_answer_timeout,
            tokens=tokens,
            health=UpstreamHealth(
                client,
                registry.name,
                failure_threshold=settings.upstream.breaker_failures,
                window=settings.upstream.breaker_window,
                backoff=settings.upstream.breaker_backoff,
                probe_interval=settings.upstream.breaker_probe_interval,
                max_retry_after=settings.upstream.rate_limit_max_backoff,
            ),
            metrics=metrics,
            max_manifest_size=settings.upstream.max_manifest_size,
        )
        for registry in settings.registries
    }
    tier = local_tier(settings, metrics)
    return PullThrough(settings, store, coordination, upstreams, metrics=metrics, tier=tier)


def listen_for_deletions(pullthrough: PullThrough) -> threading.Thread:
    """The GC's deletions reach this process's node tier as they happen (a greenlet under
    gunicorn's gevent workers; every worker listens, a deletion is idempotent)."""
    tiering = pullthrough.tiering
    assert tiering is not None

    def drop(digests: list[str]) -> None:
        for text in digests:
            if looks_like_digest(text):
                tiering.forget(Digest.parse(text))

    def reconcile() -> None:
        # What a sweep deleted while this node was not listening (stopped, Redis away).
        try:
            tiering.reconcile(pullthrough.coord.leases.blob_held)
        except (OSError, redis.RedisError) as exc:  # the bucket or Redis: the next time
            log.warning("local tier: comparing with the bucket failed: %s", exc)

    thread = threading.Thread(
        target=lambda: pullthrough.coord.tiers.listen(drop, reconcile),
        name="tier-deletions",
        daemon=True,
    )
    thread.start()
    return thread


def local_tier(settings: Settings, metrics: Metrics | None = None) -> LocalTier | None:
    """The node's local tier of an S3 store (storage.s3.local_cache), when configured."""
    if settings.s3 is None or settings.s3.local_cache is None:
        return None
    conf = settings.s3.local_cache
    return LocalTier(
        conf.path,
        conf.max_size,
        conf.low_watermark,
        settings.storage_file_mode,
        on_evict=(lambda _size: metrics.tier_evictions.inc()) if metrics is not None else None,
    )


def build_collector(settings: Settings, redis_client: redis.Redis | None = None) -> Collector:
    """The GC of a cache's store and Redis: it needs no upstream client and no app."""
    client = redis_client or connect(settings, socket_timeout=30, connect_timeout=5)
    return Collector(
        ContentStore(storage_driver(settings)),
        Coordination(client, settings.upstream.lease_ttl),
        settings.gc,
        catalog_name=functools.partial(catalog_name, settings.default_registry),
    )


def say_what_is_missing(pullthrough: PullThrough) -> bool:
    """At start-up, one line for each of Redis and the storage that cannot be used: what,
    where and what it means (a container's log is where an operator looks). True when Redis
    answers."""
    redis_ok = True
    try:
        pullthrough.coord.ping()
    except redis.RedisError as exc:
        redis_ok = False
        log.error(
            "Redis at %s is unreachable (%s): serving only what the store holds, one upstream "
            "fetch per process; /readyz answers 503 until Redis answers",
            redis_address(pullthrough.coord.redis),
            exc,
        )
    try:
        pullthrough.store.probe_writable(f"start-{os.getpid()}")
    except OSError as exc:
        where = pullthrough.settings.s3.endpoint if pullthrough.settings.s3 else None
        log.error(
            "the storage %s is not writable by uid %d (%s): nothing can be cached and /readyz "
            "answers 503; give it to that user (a volume: chown -R %d)",
            where or pullthrough.settings.storage_root,
            os.getuid(),
            exc.strerror or exc,
            os.getuid(),
        )
    return redis_ok


def clean_stale_uploads(pullthrough: PullThrough, redis_ok: bool) -> None:
    """Remove partial files left by dead fills (no live lease), keeping resumable ones fresh."""
    coordination = pullthrough.coord
    if not redis_ok:
        return  # no leases to ask: partial files are left for the next start
    try:
        removed = pullthrough.store.clean_uploads(
            lambda digest: coordination.leases.blob_held(digest),
            min_age=4 * pullthrough.settings.upstream.lease_ttl,
        )
    except OSError as exc:  # the store is down: start anyway, and answer 503s naming it
        log.warning("could not look for partial fills at start-up: %s", exc.strerror or exc)
        return
    if removed:
        log.info("removed %d partial files left by dead fills", len(removed))


def count_an_empty_store(pullthrough: PullThrough) -> None:
    """An empty store is counted from its first fill on: its totals are zero, not unknown
    until the first sweep walks it (a store with content after a Redis flush still waits
    for a walk: counting from zero would show part of it as the whole)."""
    try:
        if pullthrough.coord.store.read():
            return
        if next(iter(pullthrough.store.iter_blobs()), None) is None:
            pullthrough.coord.store.start_empty()
    except Exception as exc:  # Redis or the store down: the next sweep counts
        log.warning("could not count the store at start-up: %s", exc)


def create_app(
    settings: Settings | None = None, *, redis_client: redis.Redis | None = None
) -> Flask:
    if settings is None:
        settings = load_settings()
    logs.configure()
    app = Flask(__name__)
    app.config["SETTINGS"] = settings
    allowed_hosts = parse_allowed(settings.server_hosts)
    for warning in config_warnings(settings):
        log.warning("configuration: %s", warning)
    metrics_registry = CollectorRegistry()
    metrics = Metrics(metrics_registry)
    pullthrough = build_pullthrough(settings, redis_client, metrics)
    app.extensions["pullthrough"] = pullthrough
    app.extensions["pullthrough_metrics"] = metrics
    app.extensions["pullthrough_metrics_registry"] = metrics_registry
    clients = app.extensions["pullthrough_clients"] = Clients(pullthrough.coord.hosts, metrics)
    app.register_blueprint(v2.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(ui_bp)
    if settings.auth is not None:
        app.register_blueprint(admin_bp)  # the Guard lets only auth.admins reach it
    # Request counts and latency per route (url_rule), never per path: one digest per label
    # value would explode. Blob transfers are timed where their bytes flow (api/v2.py).
    exporter = PrometheusMetrics(
        app,
        path=None,
        registry=metrics_registry,
        group_by="url_rule",
        defaults_prefix="pullthrough",
        excluded_paths=["^/metrics$", "^/healthz$", "^/readyz$"],
    )
    # The manifest route is timed by pullthrough_manifest_seconds (api/v2.py), whose children
    # are bound once, rather than by the exporter, which builds its labels per request.
    app.view_functions["v2.manifest"] = exporter.do_not_track()(app.view_functions["v2.manifest"])
    registries = [r.name for r in settings.registries]

    @app.get("/metrics")
    def _metrics() -> Response:
        body = scrape(pullthrough.coord, registries, metrics_registry, pullthrough.tier)
        return Response(body, mimetype=CONTENT_TYPE_LATEST)

    redis_ok = say_what_is_missing(pullthrough)
    clean_stale_uploads(pullthrough, redis_ok)
    if redis_ok:
        count_an_empty_store(pullthrough)
    # A cached manifest is answered before Flask's request machinery (api/fast.py).
    app.wsgi_app = FastManifests(  # type: ignore[method-assign]
        app.wsgi_app, pullthrough, metrics, clients, allowed_hosts
    )
    if settings.auth is not None:
        # Who may pull: before the cached-manifest layer, which would answer anyone.
        app.wsgi_app = Guard(  # type: ignore[method-assign]
            app.wsgi_app, settings, pullthrough.coord.logins, metrics, clients, url_map=app.url_map
        )
    if settings.server_tls is not None:
        # Outermost: every layer sees https and the client certificate's name.
        app.wsgi_app = identified(app.wsgi_app)  # type: ignore[method-assign]
    if pullthrough.tier is not None:
        # Copies whose process died: nothing served from them, their space back.
        pullthrough.tier.clean_partials()
        listen_for_deletions(pullthrough)

    @app.errorhandler(RegistryError)
    def _registry_error(error: RegistryError) -> Response:
        g.error_cause = error.reason or error.message  # for the Hosts page
        if request.endpoint == "v2.manifest":  # not timed by the exporter (above)
            metrics.manifest_answered(request.method, "error", time.monotonic() - g.started)
        return error_response(error, head=request.method == "HEAD")

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        if isinstance(error, MethodNotAllowed):
            mapped: RegistryError = Unsupported(f"{request.method} is not supported here")
        elif error.code == 404:
            mapped = NotFound()
        else:
            mapped = RegistryError(error.description)
            mapped.status = error.code or 400
        g.error_cause = mapped.message
        return error_response(mapped, head=request.method == "HEAD")

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        refusal = storage_failure(error)
        if refusal is not None:  # disk full: a clear 503, and serving resumes with space
            log.error("storage failed on %s %s: %s", request.method, request.path, error)
            g.error_cause = refusal.reason or refusal.message
            return error_response(refusal, head=request.method == "HEAD")
        if isinstance(error, redis.RedisError):  # Redis went away mid-request
            unavailable = redis_unavailable(error)
            g.error_cause = unavailable.reason or unavailable.message
            return error_response(unavailable, head=request.method == "HEAD")
        log.exception("unexpected error on %s %s", request.method, request.path)
        g.error_cause = "internal error"
        return error_response(RegistryError("internal error"), head=request.method == "HEAD")

    @app.before_request
    def _take_turns() -> None:
        g.started = time.monotonic()
        if allowed_hosts and request.path not in OPEN_PATHS:
            host = request.headers.get("Host")
            if not host_allowed(allowed_hosts, host):
                message = f"this cache does not answer to the host name {str(host)[:100]!r}"
                raise HostNotAllowed(message, reason="host name not served here (server.hosts)")
        if request.method not in HTTP_METHODS:
            # Routing has refused it already (405); the request metrics' `method` label
            # must not take any token a client makes up.
            request.method = "OTHER"
        # Under gevent a keep-alive connection whose next request is already buffered is
        # served without ever yielding, starving the worker's other connections for
        # seconds. One switch per request (time.sleep is gevent's under gunicorn) keeps the
        # round robin fair.
        time.sleep(0)

    @app.after_request
    def _access_log(response: Response) -> Response:
        # Blob bodies are logged and counted once their last byte has gone (api/v2.py); the
        # rest here.
        if g.get("log_when_sent"):
            return response
        size = 0 if request.method == "HEAD" else response.content_length or 0
        if accesslog.enabled():
            accesslog.Pending().write(response.status_code, size)
        if request.path.startswith("/v2/"):
            clients.done(visit(), response.status_code, size, g.get("cache"), g.get("error_cause"))
        return response

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers[API_VERSION_HEADER[0]] = API_VERSION_HEADER[1]
        if request.blueprint != "ui":  # the UI sets a policy of its own
            # A manifest or blob is never a page: no type sniffing, no script, no origin.
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Content-Security-Policy"] = "sandbox"
        registry_name = g.get("registry")
        if registry_name and accesslog.query_ns():
            response.headers["OCI-Namespace"] = registry_name
        return response

    return app
