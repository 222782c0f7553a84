"""The web UI: server-rendered, read-only pages for people (overview, repositories, a
repository's tags, the hosts that pull through it, host set-up). Everything shown goes
through Jinja2's autoescaping; image names, search terms and User-Agents are user input."""

from __future__ import annotations

import contextlib
import math
import time

from flask import Blueprint, Response, abort, current_app, render_template, request
from redis.exceptions import RedisError

from registry.clients import Engine
from registry.coordination.hosts import HostRow
from registry.errors import RegistryError
from registry.inventory import tag_rows
from registry.metrics import totals
from registry.names import Route, resolve
from registry.pullthrough.service import PullThrough
from registry.ui import charts

bp = Blueprint("ui", __name__, template_folder="templates")

PAGE = 50


def _pt() -> PullThrough:
    return current_app.extensions["pullthrough"]


@bp.app_template_filter("bytes")
def human_bytes(value: float | int | None) -> str:
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@bp.app_template_filter("ago")
def _ago(when: float | None) -> str:
    if not when:
        return "never"
    seconds = max(0, time.time() - when)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


@bp.app_template_filter("until")
def _until(when: float | None) -> str:
    if not when:
        return "—"
    seconds = when - time.time()
    if seconds <= 0:
        return "due"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"in {seconds / size:.0f} {unit}"
    return f"in {seconds:.0f} s"


@bp.errorhandler(404)
def _not_found(_error: Exception) -> tuple[str, int]:
    return render_template("not_found.html"), 404


# No scripts, no frames, no third-party anything: a page that somehow rendered an image
# name unescaped still could not run script. Inline CSS is allowed (the pages carry theirs).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@bp.after_request
def _security_headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


@bp.get("/")
def overview() -> str:
    pt = _pt()
    counters = totals(current_app.extensions["pullthrough_metrics_registry"])
    answered = {"hit": 0.0, "miss": 0.0, "revalidated": 0.0, "stale": 0.0}
    served = {"cache": 0.0, "upstream": 0.0}
    for name, labels, value in counters:
        if name == "pullthrough_cache_requests_total":
            answered[labels.get("result", "")] = answered.get(labels.get("result", ""), 0) + value
        elif name == "pullthrough_served_bytes_total":
            served[labels.get("source", "")] = served.get(labels.get("source", ""), 0) + value
    total = sum(answered.values())
    from_cache = answered["hit"] + answered["revalidated"] + answered["stale"]
    upstreams, store, last_gc, redis_ok, hosts_seen = [], {}, {}, True, None
    try:
        for registry in pt.settings.registries:
            status = pt.coord.upstream_status(registry.name)
            upstreams.append(
                {
                    "name": registry.name,
                    "url": registry.url,
                    "breaker": status["breaker"],
                    "remaining": status.get("remaining"),
                    "limit": status.get("limit"),
                    "window": status.get("window"),
                }
            )
        store = pt.coord.store.read()
        last_gc = pt.coord.gc.last()
        pt.coord.hosts.flush()
        hosts_seen = len(pt.coord.hosts.addresses_seen_since(time.time() - 86400))
        savings = [_savings(pt, registry.name) for registry in pt.settings.registries]
    except RedisError:
        redis_ok, savings = False, []
    tier = None
    if pt.tier is not None:
        blobs, size = pt.tier.usage()
        tier = {"blobs": blobs, "bytes": size, "max": pt.tier.max_size}
    return render_template(
        "overview.html",
        tier=tier,
        hit_ratio=from_cache / total if total else None,
        answered=answered,
        served=served,
        upstreams=upstreams,
        store=store,
        budget=pt.settings.gc.max_size,
        last_gc=last_gc,
        redis_ok=redis_ok,
        savings=savings,
        hosts_seen=hosts_seen,
    )


def _savings(pt: PullThrough, registry: str) -> dict:
    """Upstream pulls saved today (UTC) and over 7 days, and the last 24 h as charts."""
    week = pt.coord.hourly.week(registry, time.time())
    day = week.day
    return {
        "registry": registry,
        "today": week.saved_today,
        "week": week.saved,
        "fetched_week": week.fetched,
        "pulls": charts.hourly_bars(
            [(h, f.get("saved", 0), f.get("fetched", 0)) for h, f in day],
            f"{registry}: manifest GETs per hour, last 24 h",
        ),
        "quota": charts.quota_line(
            [(h, f.get("quota_remaining")) for h, f in day],
            next((f["quota_limit"] for _, f in reversed(day) if "quota_limit" in f), None),
            f"{registry}: upstream quota left, last 24 h",
        ),
        "has_quota": any("quota_remaining" in f for _, f in day),
        "active": any(f for _, f in week.hours),
    }


@bp.get("/ui/repositories")
def repositories() -> str:
    pt = _pt()
    query = request.args.get("q", "")[:200]
    try:
        page = max(1, int(request.args.get("page", "1")))
    except ValueError:
        page = 1
    names, _more = pt.catalog(None, None)
    if query:
        names = [n for n in names if query.lower() in n.lower()]
    pages = max(1, math.ceil(len(names) / PAGE))
    page = min(page, pages)
    shown = names[(page - 1) * PAGE : page * PAGE]
    rows = []
    for name in shown:
        registry, repository = _split(pt, name)
        rows.append({"name": name, "registry": registry, "repository": repository})
    return render_template(
        "repositories.html", rows=rows, query=query, page=page, pages=pages, count=len(names)
    )


def _split(pt: PullThrough, name: str) -> tuple[str, str]:
    """(registry, repository) of a catalog name."""
    first, _, rest = name.partition("/")
    if rest and pt.settings.registry(first) is not None:
        return first, rest
    return pt.settings.default_registry, name


@bp.get("/ui/repositories/<path:name>")
def repository(name: str) -> str:
    pt = _pt()
    try:
        target = resolve(pt.settings, name, None)
    except RegistryError:
        abort(404)
    if not pt.store.list_tags(target) and not pt.store.has_manifests(f"{target}"):
        abort(404)
    auth = pt.settings.auth
    return render_template(
        "repository.html",
        name=name,
        target=str(target),
        rows=tag_rows(pt, target),
        admin=auth is not None and auth.is_admin(request.environ.get("REMOTE_USER")),
    )


def _fetching(pt: PullThrough) -> list[dict]:
    """The fills running now, in any process on any node: what, for whom, how far; a
    parallel fill's ranges each with its own progress."""
    rows = []
    for client, digest in pt.coord.limits.running():
        record = pt.coord.fills.read(digest)
        if not record.active:
            continue
        rows.append(
            {
                "digest": digest,
                "repository": record.repository,
                "upstream": record.upstream,
                "node": record.owner.split(":")[0],
                "by": "background (follower, takeover)" if client == "-" else client,
                "size": record.size,
                "written": record.written,
                "stored": record.stored,
                "ranges": [
                    {"start": start, "pos": pos, "end": end} for start, pos, end in record.ranges
                ],
            }
        )
    return rows


@bp.get("/ui/fetching")
def fetching() -> str:
    """What is being fetched from upstream now (the page reloads itself while anything is)."""
    pt = _pt()
    rows, redis_ok = [], True
    try:
        rows = _fetching(pt)
    except RedisError:
        redis_ok = False
    return render_template("fetching.html", fetching=rows, redis_ok=redis_ok)


@bp.get("/ui/follow")
def follow() -> str:
    """Followed tags, and the fetches in flight now (the page reloads itself while any is)."""
    pt = _pt()
    follows, fetching, redis_ok, spent = [], [], True, (0, 0.0)
    try:
        follows = pt.coord.follows.read(pt.coord.follows.followed())
        fetching = _fetching(pt)
        spent = pt.coord.follows.spent()
    except RedisError:
        redis_ok = False
    return render_template(
        "follow.html",
        follows=sorted(follows, key=lambda r: r.member),
        fetching=fetching,
        spent=spent,
        settings=pt.settings.follow,
        redis_ok=redis_ok,
    )


def _host_rows() -> list[dict]:
    """The Hosts page's rows (this process's last second of counts written first)."""
    pt = _pt()
    pt.coord.hosts.flush()
    now = time.time()
    rows = []
    for row in pt.coord.hosts.rows():
        rows.append(
            {
                "row": row,
                "id": f"{row.engine}@{row.address}",
                "name": pt.settings.hosts.name_of(row.address),
                "engine": ENGINE_NAMES.get(row.engine, row.engine),
                "route": ROUTE_NAMES.get(row.route, row.route or "—"),
                "stale": now - row.last_seen > pt.settings.hosts.stale_after,
                "advice": advice(row),
            }
        )
    return rows


# How the Hosts page names each engine and route (the table holds their values).
ENGINE_NAMES: dict[str, str] = {
    Engine.DOCKER: "Docker",
    Engine.CONTAINERD: "containerd",
    Engine.CONTAINERS_IMAGE: "podman / buildah (containers/image)",
    Engine.SKOPEO: "skopeo",
    Engine.CRIO: "CRI-O",
    Engine.OTHER: "other",
}
ROUTE_NAMES: dict[str, str] = {
    Route.MIRROR: "mirror (registry-mirrors, registries.conf mirror)",
    Route.NAMESPACE: "hosts.toml (?ns=)",
    Route.PREFIX: "path prefix (cache/<registry>/…)",
}


def advice(row: HostRow) -> str | None:
    """What to change for a client whose last request failed: a Docker host falls back to
    registry-1.docker.io on any error of its mirror, so the cause is here, not in what
    `docker pull` prints."""
    if row.error_status is None:
        return None
    cause = row.error_cause.lower()
    if row.error_status == 400 and "host name" in cause:
        return (
            "The host addresses the cache by a name server.hosts does not list: add that name "
            "to server.hosts, or point the host at one that is listed."
        )
    if row.error_status == 429:
        return (
            "The upstream is rate-limiting the cache: give the cache an upstream account "
            "(credentials_file), or let followed tags warm it before the hosts pull."
        )
    if row.error_status in (502, 503, 504):
        return (
            "The cache could not reach its upstream and had no copy: nothing to change on "
            "this host; check the cache's network (the overview shows each upstream)."
        )
    if row.error_status == 404:
        return (
            "The image or tag does not exist upstream (a typo, or a tag that was removed); "
            "a Docker host then asks registry-1.docker.io itself, and fails there too."
        )
    if row.error_status == 401:
        return (
            "The host sent no login the cache accepts (auth:): log it in (the forms each "
            "engine has are below), or allow its network (auth.allow_networks)."
        )
    if row.error_status == 429:
        return "Too many failed logins from this address: fix its password, then wait 15 minutes."
    if row.error_status == 403:
        return (
            "Refused: a user without an access rule for this repository (auth.access), or "
            "the cache's signature policy: see the cause."
        )
    return "See the cause: the request was refused before it reached an upstream."


@bp.get("/ui/hosts")
def hosts() -> str:
    """Every client that pulled through the cache: engine, route, counts, its last error."""
    rows, redis_ok = [], True
    try:
        rows = _host_rows()
    except RedisError:
        redis_ok = False
    return render_template(
        "hosts.html", rows=rows, redis_ok=redis_ok, stale_after=_pt().settings.hosts.stale_after
    )


@bp.get("/ui/setup")
def setup() -> str:
    host = request.host
    registries = [r.name for r in _pt().settings.registries]
    failing = []
    with contextlib.suppress(RedisError):
        failing = [r for r in _host_rows() if r["advice"] is not None]
    settings = _pt().settings
    return render_template(
        "setup.html",
        host=host,
        scheme="https" if settings.server_tls else "http",
        tls=settings.server_tls,
        auth=settings.auth,
        registries=registries,
        failing=failing,
    )
