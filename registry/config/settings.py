"""The settings: frozen dataclasses, one per section of the YAML file, and the one place each
setting's default is written (schema.py validates, loading.py builds these from what a file
gives; a key it leaves out keeps the default here)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"
# upstream.metadata_timeout when it is not set (and read_timeout is longer).
METADATA_TIMEOUT = 5.0
# storage.s3.redirect_ttl: how long a presigned URL lives when redirect is on.
REDIRECT_TTL = 300


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class TagRule:
    """Tags whose `<repository>:<tag>` matches the glob `match` get their own TTL
    (`math.inf` for immutable tags, never revalidated)."""

    match: str
    ttl: float


class VerifyMode(StrEnum):
    ENFORCE = "enforce"  # unsigned, or not signed by a configured key: 403
    WARN = "warn"  # served anyway, logged, marked in the UI


@dataclass(frozen=True)
class VerifyRule:
    """Manifests of repositories matching the glob `repositories` must carry a cosign
    signature by one of `keys` (PEM public keys); `key_set` names that set of keys."""

    repositories: str
    keys: tuple[str, ...] = field(repr=False)
    mode: VerifyMode
    key_set: str


@dataclass(frozen=True)
class RegistrySettings:
    name: str
    url: str
    credentials: Credentials | None = None
    # True, False, or the path of a CA bundle (what `requests` takes as `verify`).
    tls_verify: bool | str = True
    tag_ttl: float = 300.0
    tag_rules: tuple[TagRule, ...] = ()
    # Hosts a redirect or token realm may point to although they resolve to a loopback,
    # link-local or private address (the upstream's own host always may).
    redirect_allow: tuple[str, ...] = ()
    # How long a cached referrers list is served before upstream is asked again.
    referrers_ttl: float = 300.0
    # Signature policies, the first whose glob matches the repository applies.
    verify: tuple[VerifyRule, ...] = ()

    def verify_rule(self, repository: str) -> VerifyRule | None:
        return next(
            (r for r in self.verify if fnmatch.fnmatchcase(repository, r.repositories)), None
        )

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def hostname(self) -> str:
        return urlsplit(self.url).hostname or ""

    def ttl_of(self, repository: str, tag: str) -> float:
        """How long a cached tag is served without asking upstream: the first matching rule."""
        name = f"{repository}:{tag}"
        for rule in self.tag_rules:
            if fnmatch.fnmatchcase(name, rule.match):
                return rule.ttl
        return self.tag_ttl


@dataclass(frozen=True)
class GcSettings:
    """The GC worker's schedule and retention rules (all retention is off by default)."""

    interval: float = 86400.0  # seconds between scheduled sweeps
    delay: float = 86400.0  # unreferenced content younger than this is never deleted
    keep_pulled_within: float | None = None  # seconds; older-pulled tags are dropped
    max_size: int | None = None  # byte budget of the store
    low_watermark: float = 0.9  # evict down to this fraction of max_size
    pins: tuple[str, ...] = ()  # globs over "<registry>/<repository>:<tag>", never evicted

    def pinned(self, repo: str, tag: str) -> bool:
        """Whether a `pins` glob keeps `<repo>:<tag>` (repo: `<registry>/<repository>`)."""
        return any(fnmatch.fnmatchcase(f"{repo}:{tag}", glob) for glob in self.pins)


@dataclass(frozen=True)
class FollowRule:
    """Tags to keep warm: `image` is `[registry/]repository:tag`, where the repository may
    be a glob (over repositories the cache holds) and the tag a glob (`16*`) or a version
    range (`>=7 <8`, PEP 440 versions: `7.2.4`, not `7.2-alpine`)."""

    image: str
    platforms: tuple[str, ...] = ()  # empty: those pulled before (else every platform)
    interval: float | None = None  # None: follow.interval


@dataclass(frozen=True)
class FollowSettings:
    """Keeping followed tags warm (off while `images` is empty and `pulled_within` unset)."""

    images: tuple[FollowRule, ...] = ()
    interval: float = 3600.0  # how often each followed tag is checked (spread over it)
    pulled_within: float | None = None  # also follow every tag pulled this recently
    quota_reserve: float = 0.2  # leave this share of Docker Hub's quota to clients
    keep_previous: int = 1  # previous digests of a followed tag kept from the GC
    tick: float = 30.0  # how often the scheduler looks for due checks
    # Bytes the follower may bring from upstream per `interval`, all its ticks together;
    # past them the rest waits for the next interval.
    max_bytes: int = 10 * 1024**3

    @property
    def enabled(self) -> bool:
        return bool(self.images) or self.pulled_within is not None


@dataclass(frozen=True)
class UpstreamSettings:
    """`upstream:`: how every upstream is asked."""

    connect_timeout: float = 5.0
    # How long a blob download may stay silent mid-body.
    read_timeout: float = 30.0
    # Blobs of at least range_min_size are fetched as up to parallel_ranges concurrent Range
    # requests (when upstream honours Range): a CDN that limits each connection then gives a
    # cold pull several connections' worth. 1: one stream per blob.
    parallel_ranges: int = 4
    range_min_size: int = 32 << 20
    # How long to wait for a small answer (manifest, HEAD, token, tag list): short, because
    # a cached tag is served stale when it runs out, and an uncached one should fail fast.
    # None: METADATA_TIMEOUT, or read_timeout when that is shorter.
    metadata_timeout: float | None = None
    # A fill's Redis lease lapses this long after its holder stops renewing it (kill -9).
    lease_ttl: float = 5.0
    # Manifests larger than this are refused (distribution uses the same 4 MiB bound).
    max_manifest_size: int = 4 * 1024 * 1024
    # "Upstream has no such tag/repository" is remembered this long, so retry storms stay here.
    negative_ttl: float = 30.0
    # Circuit breaker: this many upstream failures within breaker_window seconds stop all
    # calls to that upstream for breaker_backoff seconds (cached content is served meanwhile).
    breaker_failures: int = 5
    breaker_window: float = 30.0
    breaker_backoff: float = 30.0
    # While the breaker is open, one request in this many seconds (from all workers and nodes
    # together) still goes upstream as a probe: the first to get through closes the breaker,
    # so service comes back within this long of the upstream's return.
    breaker_probe_interval: float = 2.0
    # A 429 stops all calls to that upstream for its Retry-After, but never longer than this
    # (one client spending the quota must not stop everyone for Docker Hub's 6 hours).
    rate_limit_max_backoff: float = 900.0
    # A cached tag is served stale (upstream failing, or refusing us) at most this long after
    # upstream last confirmed it, so content withdrawn upstream stops being served; None:
    # forever.
    max_stale: float | None = 7 * 86400.0

    @property
    def small_answer_timeout(self) -> float:
        """metadata_timeout, or its default bounded by read_timeout."""
        if self.metadata_timeout is not None:
            return self.metadata_timeout
        return min(METADATA_TIMEOUT, self.read_timeout)


@dataclass(frozen=True)
class LimitsSettings:
    """`limits:`: what one unauthenticated client can pile up (docs/security.md)."""

    # Fills running at once, in all and started by one client address (0: no per-client
    # bound); beyond them a blob miss gets 429 with Retry-After.
    max_fills: int = 128
    max_fills_per_client: int = 32
    # Upstream-reaching requests one client address may cause per minute (0: no bound).
    client_upstream_per_minute: int = 1200
    # One referrers list from upstream, all its `Link` pages together: at most this many
    # bytes and descriptors; and lists fetched at once per process (more wait, then 429).
    referrers_max_bytes: int = 4 * 1024 * 1024
    referrers_max_descriptors: int = 10_000
    referrers_fetches: int = 4


@dataclass(frozen=True)
class HostsSettings:
    """`hosts:`: the table of the clients that pull through the cache (the Hosts page)."""

    # A client not seen for this long is marked stale.
    stale_after: float = 7 * 86400.0
    # At most this many clients (an address and its engine) are kept; the least recently
    # seen go first.
    max: int = 1000
    # Names for addresses, shown beside them (`names: {"10.0.0.5": "nuc"}` in the file).
    names: tuple[tuple[str, str], ...] = ()

    def name_of(self, address: str) -> str | None:
        for known, name in self.names:
            if known == address:
                return name
        return None


@dataclass(frozen=True)
class S3Settings:
    """Content in an S3-compatible bucket (`storage.driver: s3`) instead of `storage.root`."""

    bucket: str
    endpoint: str | None = None  # None: AWS's own, from the region
    region: str = "us-east-1"
    # None: boto3's usual sources (AWS_ACCESS_KEY_ID and friends, ~/.aws, instance roles).
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    prefix: str = ""
    path_style: bool = True
    tls_verify: bool | str = True
    # Size of the pieces a fill is stored in while it runs (S3 wants parts of 5 MiB or more).
    part_size: int = 8 << 20
    # Answer blob GETs with a redirect to a presigned URL valid this long (0: serve them).
    redirect_ttl: int = 0
    # Verified copies of blobs on this node's own disk (store/tier.py); None: off.
    local_cache: LocalCacheSettings | None = None
    # How long a process reuses the bucket's word that a blob (or a repository's link to it)
    # exists while nothing was deleted from the store (pullthrough/presence.py); 0: ask
    # the bucket on every request.
    lookup_ttl: float = 30.0


@dataclass(frozen=True)
class LocalCacheSettings:
    """`storage.s3.local_cache`: the node's local tier of an S3 store."""

    path: Path
    max_size: int
    low_watermark: float = 0.8


@dataclass(frozen=True)
class TlsSettings:
    """`server.tls:`: the cache's own certificate, served on its port (registry/tls.py)."""

    cert: Path
    key: Path
    # Only clients with a certificate signed by this CA are served over TLS.
    client_ca: Path | None = None


class Gate(StrEnum):
    """Who may read the web pages (auth.ui) or /metrics (auth.metrics)."""

    OPEN = "open"  # anyone who reaches the port
    LOGIN = "login"  # the users of auth.htpasswd (and, for /metrics, auth.metrics_token_file)


@dataclass(frozen=True)
class AccessRule:
    """`auth.access[]`: these users (or members of these groups) may pull these
    repositories (globs over `<repository>` and `<registry>/<repository>`; `*` crosses `/`)."""

    repositories: tuple[str, ...]
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthSettings:
    """`auth:`: who may pull (registry/auth.py). Without this section anyone may."""

    # Users and their bcrypt hashes, as `htpasswd -B` writes them; reread when it changes.
    htpasswd: Path | None = None
    # Anyone may pull without a login.
    anonymous: bool = False
    # Clients from these networks (CIDR) may pull without a login (Docker's registry-mirrors
    # sends none to a mirror).
    allow_networks: tuple[str, ...] = ()
    # Group names and their users, for access rules.
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Empty: every user may pull every repository; else only what a rule grants.
    access: tuple[AccessRule, ...] = ()
    # Users (or groups) with the admin role: refresh, evict, pin and unpin from the UI or
    # POST /admin/<action>.
    admins: tuple[str, ...] = ()
    ui: Gate = Gate.LOGIN
    metrics: Gate = Gate.LOGIN
    # A file holding a bearer token Prometheus may scrape /metrics with.
    metrics_token_file: Path | None = None
    # Lifetime of the tokens the cache's token endpoint issues.
    token_ttl: int = 300
    # Failed logins one client address may make in 15 minutes before it is refused.
    max_failed_logins: int = 10

    def groups_of(self, user: str) -> tuple[str, ...]:
        return tuple(group for group, users in self.groups if user in users)

    def is_admin(self, user: str | None) -> bool:
        if not user:
            return False
        return user in self.admins or any(g in self.admins for g in self.groups_of(user))


@dataclass(frozen=True)
class Settings:
    """Everything configured: a section's settings in the section's dataclass."""

    storage_root: Path = Path("data")
    s3: S3Settings | None = None
    # /readyz fails when the storage file system has less free space than this.
    min_free_bytes: int = 1 << 30
    # Mode of the files the filesystem store creates (less the process umask); its root
    # directory gets the same with x wherever r (0640 -> 0750).
    storage_file_mode: int = 0o640
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    # Redis Sentinel: (host, port) of each sentinel, which find the master named redis_master;
    # redis_url then only gives the database number and the password.
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_master: str = "mymaster"
    # The sentinels' own password (their `requirepass`), when they have one.
    redis_sentinel_password: str | None = field(default=None, repr=False)
    registries: tuple[RegistrySettings, ...] = (RegistrySettings(DEFAULT_REGISTRY, DOCKER_HUB_URL),)
    default_registry: str = DEFAULT_REGISTRY
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    gc: GcSettings = field(default_factory=GcSettings)
    follow: FollowSettings = field(default_factory=FollowSettings)
    hosts: HostsSettings = field(default_factory=HostsSettings)
    # Host names (and host:port) requests may address the cache by; empty: any. A web page
    # cannot then reach the cache through a DNS name of its own (DNS rebinding).
    server_hosts: tuple[str, ...] = ()
    # TLS on the cache's port, beside plain HTTP on the same port while server_plain holds
    # (each connection's first byte tells them apart).
    server_tls: TlsSettings | None = None
    server_plain: bool = True
    auth: AuthSettings | None = None

    def registry(self, name: str) -> RegistrySettings | None:
        for registry in self.registries:
            if registry.name == name:
                return registry
        return None
