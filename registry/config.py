"""Configuration: one YAML file validated by marshmallow into frozen settings.

The file's path comes from `PULLTHROUGH_CONFIG`; without it the defaults below describe the
user's setup (Docker Hub, data under ./data). `REDIS_URL` in the environment overrides
`redis.url` so `make run` can hand over its private Redis (`REDIS_SENTINEL_PASSWORD` likewise
overrides `redis.sentinel_password`), and `PULLTHROUGH_STORAGE_ROOT`
overrides `storage.root` (the container image points it at its volume). Every problem is
reported with its key path (`registries.0.url: Not a valid URL.`) and nothing starts
half-configured.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from marshmallow import Schema, ValidationError, fields, pre_load, validate, validates_schema

from registry.hostnames import split_host

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"
DEFAULT_TAG_TTL = 300.0
DEFAULT_REFERRERS_TTL = 300.0

# limits.referrers_*: the bounds of one referrers list fetched from upstream.
REFERRERS_MAX_BYTES = 4 * 1024 * 1024
REFERRERS_MAX_DESCRIPTORS = 10_000
REFERRERS_FETCHES = 4
# follow.max_bytes: what the follower may fetch per interval.
FOLLOW_MAX_BYTES = 10 * 1024**3
_REGISTRY_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?")  # as names.py


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every one with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


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
    tag_ttl: float = DEFAULT_TAG_TTL
    tag_rules: tuple[TagRule, ...] = ()
    # Hosts a redirect or token realm may point to although they resolve to a loopback,
    # link-local or private address (the upstream's own host always may).
    redirect_allow: tuple[str, ...] = ()
    # How long a cached referrers list is served before upstream is asked again.
    referrers_ttl: float = DEFAULT_REFERRERS_TTL
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
    max_bytes: int = FOLLOW_MAX_BYTES

    @property
    def enabled(self) -> bool:
        return bool(self.images) or self.pulled_within is not None


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
class Settings:
    storage_root: Path
    s3: S3Settings | None = None
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    # Redis Sentinel: (host, port) of each sentinel, which find the master named redis_master;
    # redis_url then only gives the database number and the password.
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_master: str = "mymaster"
    # The sentinels' own password (their `requirepass`), when they have one.
    redis_sentinel_password: str | None = field(default=None, repr=False)
    registries: tuple[RegistrySettings, ...] = (RegistrySettings(DEFAULT_REGISTRY, DOCKER_HUB_URL),)
    default_registry: str = DEFAULT_REGISTRY
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
    metadata_timeout: float = 5.0
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
    # Fills running at once, in all and started by one client address (0: no per-client
    # bound); beyond them a blob miss gets 429 with Retry-After.
    max_fills: int = 128
    max_fills_per_client: int = 32
    # Upstream-reaching requests one client address may cause per minute (0: no bound).
    client_upstream_per_minute: int = 1200
    # One referrers list from upstream, all its `Link` pages together: at most this many
    # bytes and descriptors; and lists fetched at once per process (more wait, then 429).
    referrers_max_bytes: int = REFERRERS_MAX_BYTES
    referrers_max_descriptors: int = REFERRERS_MAX_DESCRIPTORS
    referrers_fetches: int = REFERRERS_FETCHES
    gc: GcSettings = field(default_factory=GcSettings)
    follow: FollowSettings = field(default_factory=FollowSettings)
    # /readyz fails when the storage file system has less free space than this.
    min_free_bytes: int = 1 << 30
    # Mode of the files the filesystem store creates (less the process umask); its root
    # directory gets the same with x wherever r (0640 -> 0750).
    storage_file_mode: int = 0o640
    # Host names (and host:port) requests may address the cache by; empty: any. A web page
    # cannot then reach the cache through a DNS name of its own (DNS rebinding).
    server_hosts: tuple[str, ...] = ()

    def registry(self, name: str) -> RegistrySettings | None:
        for registry in self.registries:
            if registry.name == name:
                return registry
        return None


def _url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValidationError("Not a valid http(s) URL.")
    if "@" in parts.netloc:
        # It would end up in logs and error messages: credentials have keys of their own.
        raise ValidationError(
            "Credentials do not belong in the URL: use username and password (or the "
            "credentials file)."
        )


class TagRuleSchema(Schema):
    match = fields.String(required=True, validate=validate.Length(min=1))
    ttl = fields.Float(load_default=None, validate=validate.Range(min=0))
    immutable = fields.Boolean(load_default=False)

    @validates_schema
    def _one_of(self, data: dict[str, Any], **_: Any) -> None:
        if (data.get("ttl") is None) == (not data.get("immutable")):
            raise ValidationError("give either ttl or immutable: true", "ttl")


def _pem_or_file(value: str) -> str:
    """A PEM key as given, or the contents of the file it names (`/etc/keys/cosign.pub`)."""
    if value.lstrip().startswith("-----BEGIN"):
        return value
    try:
        return Path(value).read_text()
    except OSError as exc:
        raise ValidationError(f"cannot read the key file {value}: {exc.strerror}") from None


class VerifySchema(Schema):
    repositories = fields.String(load_default="*", validate=validate.Length(min=1))
    cosign_keys = fields.List(
        fields.String(validate=validate.Length(min=1)),
        required=True,
        validate=validate.Length(min=1),
    )
    mode = fields.Enum(VerifyMode, by_value=True, load_default=VerifyMode.ENFORCE)

    @validates_schema
    def _keys_load(self, data: dict[str, Any], **_: Any) -> None:
        from registry.cosign import load_key

        for index, value in enumerate(data.get("cosign_keys") or []):
            try:
                load_key(_pem_or_file(value))
            except ValueError as exc:
                raise ValidationError(
                    f"key {index} is not a PEM public key cosign can use: {exc}", "cosign_keys"
                ) from None


class RegistrySchema(Schema):
    name = fields.String(required=True, validate=validate.Regexp(_REGISTRY_NAME))
    url = fields.String(load_default=None, validate=_url)
    username = fields.String(load_default=None)
    password = fields.String(load_default=None)
    tls_verify = fields.Boolean(load_default=True)
    ca_bundle = fields.String(load_default=None)
    redirect_allow = fields.List(fields.String(validate=validate.Length(min=1)), load_default=list)
    tag_ttl = fields.Float(load_default=DEFAULT_TAG_TTL, validate=validate.Range(min=0))
    tag_ttl_overrides = fields.List(fields.Nested(TagRuleSchema), load_default=list)
    referrers_ttl = fields.Float(load_default=DEFAULT_REFERRERS_TTL, validate=validate.Range(min=0))
    verify = fields.List(fields.Nested(VerifySchema), load_default=list)

    @pre_load
    def _one_verify_rule(self, data: Any, **_: Any) -> Any:
        # `verify: {cosign_keys, mode}` for the whole registry, or a list of rules.
        if isinstance(data, dict) and isinstance(data.get("verify"), dict):
            data = {**data, "verify": [data["verify"]]}
        return data

    @validates_schema
    def _credentials_pair(self, data: dict[str, Any], **_: Any) -> None:
        if (data.get("username") is None) != (data.get("password") is None):
            raise ValidationError("username and password go together.", "username")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


class Duration(fields.Field):
    """Seconds, or a number with a unit: `90s`, `15m`, `24h`, `7d`, `2w`."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        match = _DURATION.fullmatch(str(value).strip().lower())
        if not match:
            raise ValidationError("Not a duration (seconds, or e.g. 15m, 24h, 7d).")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


class ByteSize(fields.Field):
    """Bytes, or a number with a unit: `500MB`, `50GiB`, `2T` (powers of 1024 with `i`)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        match = _SIZE.fullmatch(str(value).strip())
        if not match:
            raise ValidationError("Not a size (bytes, or e.g. 500MB, 50GiB).")
        unit = match.group(2).lower()
        scale = _SIZE_UNITS[unit[:1]]
        if "i" in unit:
            scale = 1024 ** " kmgt".index(unit[0])
        return int(float(match.group(1)) * scale)


class LocalCacheSchema(Schema):
    path = fields.String(required=True, validate=validate.Length(min=1))
    max_size = ByteSize(required=True, validate=validate.Range(min=1 << 20))
    low_watermark = fields.Float(load_default=0.8, validate=validate.Range(min=0.1, max=1.0))


class S3Schema(Schema):
    bucket = fields.String(required=True, validate=validate.Length(min=3, max=63))
    endpoint = fields.String(load_default=None, validate=_url)
    region = fields.String(load_default="us-east-1")
    access_key = fields.String(load_default=None)
    secret_key = fields.String(load_default=None)
    prefix = fields.String(load_default="")
    path_style = fields.Boolean(load_default=True)
    tls_verify = fields.Boolean(load_default=True)
    ca_bundle = fields.String(load_default=None)
    part_size = ByteSize(load_default=8 << 20, validate=validate.Range(min=5 << 20, max=5 << 30))
    redirect = fields.Boolean(load_default=False)
    redirect_ttl = Duration(load_default=300.0, validate=validate.Range(min=10, max=7 * 86400))
    local_cache = fields.Nested(LocalCacheSchema, load_default=None)
    lookup_ttl = Duration(load_default=30.0, validate=validate.Range(min=0, max=3600))

    @validates_schema(skip_on_field_errors=False)
    def _credentials_pair(self, data: dict[str, Any], **_: Any) -> None:
        if (data.get("access_key") is None) != (data.get("secret_key") is None):
            raise ValidationError("access_key and secret_key go together.", "access_key")

    @validates_schema(skip_on_field_errors=False)
    def _redirect_or_local_cache(self, data: dict[str, Any], **_: Any) -> None:
        # A redirected client reads the bucket itself: a local copy would serve nobody.
        if data.get("redirect") and data.get("local_cache"):
            raise ValidationError(
                "redirect and local_cache are not combined: choose one.", "local_cache"
            )


class StorageSchema(Schema):
    driver = fields.String(load_default="filesystem", validate=validate.OneOf(["filesystem", "s3"]))
    root = fields.String(load_default="./data")
    min_free = ByteSize(load_default=1 << 30, validate=validate.Range(min=0))
    file_mode = fields.String(
        load_default="0640",
        validate=validate.Regexp(r"0?[0-7]{3}", error="An octal file mode such as 0640."),
    )
    s3 = fields.Nested(S3Schema, load_default=None)

    @validates_schema
    def _s3_needs_bucket(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("driver") == "s3" and not data.get("s3"):
            raise ValidationError("driver s3 needs storage.s3 with at least a bucket.", "s3")


class RedisSchema(Schema):
    url = fields.String(load_default="redis://127.0.0.1:6379/0")
    sentinels = fields.List(
        fields.String(validate=validate.Regexp(r"[^\s:]+:[0-9]{1,5}", error="Not host:port.")),
        load_default=list,
    )
    master = fields.String(load_default="mymaster", validate=validate.Length(min=1))
    sentinel_password = fields.String(load_default=None)


class UpstreamSchema(Schema):
    connect_timeout = fields.Float(load_default=5.0, validate=validate.Range(min=0.1))
    read_timeout = fields.Float(load_default=30.0, validate=validate.Range(min=0.1))
    parallel_ranges = fields.Integer(load_default=4, validate=validate.Range(min=1, max=16))
    range_min_size = ByteSize(load_default=32 << 20, validate=validate.Range(min=1 << 20))
    metadata_timeout = fields.Float(load_default=None, validate=validate.Range(min=0.1))
    lease_ttl = fields.Float(load_default=5.0, validate=validate.Range(min=1))
    negative_ttl = fields.Float(load_default=30.0, validate=validate.Range(min=0))
    breaker_failures = fields.Integer(load_default=5, validate=validate.Range(min=1))
    breaker_window = fields.Float(load_default=30.0, validate=validate.Range(min=1))
    breaker_backoff = fields.Float(load_default=30.0, validate=validate.Range(min=0.1))
    breaker_probe_interval = fields.Float(load_default=2.0, validate=validate.Range(min=0.1))
    rate_limit_max_backoff = Duration(load_default=900.0, validate=validate.Range(min=1))
    max_stale = Duration(load_default=7 * 86400.0, allow_none=True, validate=validate.Range(min=0))


class LimitsSchema(Schema):
    max_fills = fields.Integer(load_default=128, validate=validate.Range(min=1))
    max_fills_per_client = fields.Integer(load_default=32, validate=validate.Range(min=0))
    client_upstream_per_minute = fields.Integer(load_default=1200, validate=validate.Range(min=0))
    referrers_max_bytes = ByteSize(
        load_default=REFERRERS_MAX_BYTES, validate=validate.Range(min=64 * 1024)
    )
    referrers_max_descriptors = fields.Integer(
        load_default=REFERRERS_MAX_DESCRIPTORS, validate=validate.Range(min=1)
    )
    referrers_fetches = fields.Integer(
        load_default=REFERRERS_FETCHES, validate=validate.Range(min=1)
    )


class GcSchema(Schema):
    interval = Duration(load_default=86400.0, validate=validate.Range(min=1))
    delay = Duration(load_default=86400.0, validate=validate.Range(min=0))
    keep_pulled_within = Duration(load_default=None, validate=validate.Range(min=60))
    max_size = ByteSize(load_default=None, validate=validate.Range(min=1))
    low_watermark = fields.Float(load_default=0.9, validate=validate.Range(min=0.1, max=1))
    pins = fields.List(fields.String(validate=validate.Length(min=1)), load_default=list)


class FollowRuleSchema(Schema):
    image = fields.String(required=True, validate=validate.Length(min=3, max=300))
    platforms = fields.List(fields.String(validate=validate.Length(min=1)), load_default=list)
    interval = Duration(load_default=None, validate=validate.Range(min=10))

    @validates_schema
    def _pattern(self, data: dict[str, Any], **_: Any) -> None:
        from registry.follow import parse_pattern

        try:
            parse_pattern(data.get("image", ""))
        except ValueError as exc:
            raise ValidationError(str(exc), "image") from None


class FollowSchema(Schema):
    images = fields.List(fields.Nested(FollowRuleSchema), load_default=list)
    interval = Duration(load_default=3600.0, validate=validate.Range(min=10))
    pulled_within = Duration(load_default=None, validate=validate.Range(min=60))
    quota_reserve = fields.Float(load_default=0.2, validate=validate.Range(min=0, max=1))
    keep_previous = fields.Integer(load_default=1, validate=validate.Range(min=0, max=10))
    tick = Duration(load_default=30.0, validate=validate.Range(min=1))
    max_bytes = ByteSize(load_default=FOLLOW_MAX_BYTES, validate=validate.Range(min=1))


def _host_entry(value: str) -> None:
    if split_host(value) is None:
        raise ValidationError(f"{value!r} is not a host name, host:port or .domain.")


class ServerSchema(Schema):
    # `name`, `name:port`, `.domain` (registry/hostnames.py).
    hosts = fields.List(fields.String(validate=_host_entry), load_default=list)


class SettingsSchema(Schema):
    # Defaults go through their schema so that nested defaults apply too.
    server = fields.Nested(ServerSchema, load_default=lambda: ServerSchema().load({}))
    limits = fields.Nested(LimitsSchema, load_default=lambda: LimitsSchema().load({}))
    storage = fields.Nested(StorageSchema, load_default=lambda: StorageSchema().load({}))
    redis = fields.Nested(RedisSchema, load_default=lambda: RedisSchema().load({}))
    upstream = fields.Nested(UpstreamSchema, load_default=lambda: UpstreamSchema().load({}))
    gc = fields.Nested(GcSchema, load_default=lambda: GcSchema().load({}))
    follow = fields.Nested(FollowSchema, load_default=lambda: FollowSchema().load({}))
    credentials_file = fields.String(load_default=None)
    default_registry = fields.String(load_default=DEFAULT_REGISTRY)
    registries = fields.List(
        fields.Nested(RegistrySchema),
        load_default=lambda: [RegistrySchema().load({"name": DEFAULT_REGISTRY})],
        validate=validate.Length(min=1),
    )

    @validates_schema
    def _registries(self, data: dict[str, Any], **_: Any) -> None:
        names = [r["name"] for r in data.get("registries", [])]
        if len(names) != len(set(names)):
            raise ValidationError("registry names must be unique.", "registries")
        if data.get("default_registry", DEFAULT_REGISTRY) not in names:
            raise ValidationError("must name one of the configured registries.", "default_registry")


def _flatten(messages: Any, prefix: str = "") -> list[str]:
    if isinstance(messages, dict):
        out: list[str] = []
        for key, value in messages.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.extend(_flatten(value, path))
        return out
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [f"{prefix}: {m}" for m in messages]
    if isinstance(messages, list):
        return [line for m in messages for line in _flatten(m, prefix)]
    return [f"{prefix}: {messages}"]


def _host_port(entry: str) -> tuple[str, int]:
    host, _, port = entry.rpartition(":")
    return host, int(port)


def config_warnings(settings: Settings) -> list[str]:
    """What a valid configuration says that is likely not meant: a `verify` rule that can
    match no repository the cache will ever serve (which would leave images unchecked)."""
    out = []
    for registry in settings.registries:
        for n, rule in enumerate(registry.verify):
            where = f"registries[{registry.name}].verify[{n}].repositories {rule.repositories!r}"
            literal = re.sub(r"\[[^\]]*\]|[*?]", "", rule.repositories)
            if re.search(r"[^a-z0-9._/-]", literal):
                out.append(
                    f"{where} can match no repository: names are lowercase letters, digits "
                    "and . _ - / only"
                )
            elif rule.repositories.startswith(f"{registry.name}/"):
                out.append(f"{where} names the registry: repositories are matched without it")
            elif (
                registry.name == "docker.io"
                and not rule.repositories.startswith("*")
                and ("/" not in rule.repositories)
            ):  # `*` crosses `/` here: `*` and `*-app` reach library/ too
                out.append(
                    f"{where} has no '/': Docker Hub's official images are library/<name> "
                    f"(library/{rule.repositories})"
                )
    return out


def _verify_rule(raw: dict[str, Any]) -> VerifyRule:
    from registry.cosign import key_set_id

    keys = tuple(_pem_or_file(value) for value in raw["cosign_keys"])
    return VerifyRule(raw["repositories"], keys, raw["mode"], key_set_id(list(keys)))


def load_credentials_file(path: str) -> dict[str, Credentials]:
    """Read `{"registry-1.docker.io": {"username", "password"}}` (the Zot file's shape)."""
    try:
        file = Path(path)
        raw = json.loads(file.read_text())
        mode = file.stat().st_mode
        if mode & 0o077:
            log.warning(
                "credentials_file %s can be read by other users (mode %o): chmod 600 it",
                path,
                mode & 0o777,
            )
    except OSError as exc:
        raise ConfigError([f"credentials_file: cannot read {path}: {exc.strerror}"]) from None
    except ValueError:
        raise ConfigError([f"credentials_file: {path} is not valid JSON"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(["credentials_file: must be an object keyed by registry host"])
    out: dict[str, Credentials] = {}
    for host, entry in raw.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("username"), str)
            and isinstance(entry.get("password"), str)
        ):
            raise ConfigError([f"credentials_file.{host}: needs string username and password"])
        out[host] = Credentials(entry["username"], entry["password"])
    return out


def settings_from_mapping(raw: Any, env: dict[str, str] | None = None) -> Settings:
    """Validate a parsed config mapping (plus environment overrides) into Settings."""
    env = dict(os.environ if env is None else env)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(root): the configuration must be a mapping"])
    try:
        data = SettingsSchema().load(raw)
    except ValidationError as exc:
        raise ConfigError(_flatten(exc.messages)) from None

    from_file: dict[str, Credentials] = {}
    if data["credentials_file"]:
        from_file = load_credentials_file(data["credentials_file"])

    registries = []
    for entry in data["registries"]:
        url = entry["url"] or (DOCKER_HUB_URL if entry["name"] == "docker.io" else None)
        if url is None:
            url = f"https://{entry['name']}"
        host = urlsplit(url).netloc
        creds = None
        if entry["username"] is not None:
            creds = Credentials(entry["username"], entry["password"])
        else:
            # Keyed by the URL's host, or by the registry's name only while the URL is that
            # registry's own (a docker.io password never goes to a mirror configured as
            # docker.io's URL).
            own_host = urlsplit(DOCKER_HUB_URL).netloc if entry["name"] == "docker.io" else None
            by_name = host in (entry["name"], own_host)
            creds = from_file.get(host) or (from_file.get(entry["name"]) if by_name else None)
        verify: bool | str = entry["tls_verify"]
        if entry["ca_bundle"]:
            verify = entry["ca_bundle"]
        registries.append(
            RegistrySettings(
                name=entry["name"],
                url=url.rstrip("/"),
                credentials=creds,
                tls_verify=verify,
                tag_ttl=entry["tag_ttl"],
                redirect_allow=tuple(h.lower() for h in entry["redirect_allow"]),
                tag_rules=tuple(
                    TagRule(rule["match"], math.inf if rule["immutable"] else rule["ttl"])
                    for rule in entry["tag_ttl_overrides"]
                ),
                referrers_ttl=entry["referrers_ttl"],
                verify=tuple(_verify_rule(rule) for rule in entry["verify"]),
            )
        )

    upstream = data["upstream"]
    s3 = None
    if data["storage"]["driver"] == "s3":
        raw_s3 = data["storage"]["s3"]
        s3 = S3Settings(
            bucket=raw_s3["bucket"],
            endpoint=raw_s3["endpoint"],
            region=raw_s3["region"],
            access_key=raw_s3["access_key"],
            secret_key=raw_s3["secret_key"],
            prefix=raw_s3["prefix"],
            path_style=raw_s3["path_style"],
            tls_verify=raw_s3["ca_bundle"] or raw_s3["tls_verify"],
            part_size=raw_s3["part_size"],
            redirect_ttl=int(raw_s3["redirect_ttl"]) if raw_s3["redirect"] else 0,
            local_cache=_local_cache(raw_s3["local_cache"]),
            lookup_ttl=raw_s3["lookup_ttl"],
        )
    return Settings(
        s3=s3,
        storage_root=Path(env.get("PULLTHROUGH_STORAGE_ROOT") or data["storage"]["root"]).resolve(),
        min_free_bytes=data["storage"]["min_free"],
        storage_file_mode=int(data["storage"]["file_mode"], 8),
        server_hosts=tuple(data["server"]["hosts"]),
        redis_url=env.get("REDIS_URL") or data["redis"]["url"],
        redis_sentinels=tuple(_host_port(entry) for entry in data["redis"]["sentinels"]),
        redis_master=data["redis"]["master"],
        redis_sentinel_password=env.get("REDIS_SENTINEL_PASSWORD")
        or data["redis"]["sentinel_password"],
        registries=tuple(registries),
        default_registry=data["default_registry"],
        connect_timeout=upstream["connect_timeout"],
        read_timeout=upstream["read_timeout"],
        parallel_ranges=upstream["parallel_ranges"],
        range_min_size=upstream["range_min_size"],
        metadata_timeout=upstream["metadata_timeout"] or min(5.0, upstream["read_timeout"]),
        lease_ttl=upstream["lease_ttl"],
        negative_ttl=upstream["negative_ttl"],
        breaker_failures=upstream["breaker_failures"],
        breaker_window=upstream["breaker_window"],
        breaker_backoff=upstream["breaker_backoff"],
        breaker_probe_interval=upstream["breaker_probe_interval"],
        rate_limit_max_backoff=upstream["rate_limit_max_backoff"],
        max_stale=upstream["max_stale"],
        max_fills=data["limits"]["max_fills"],
        max_fills_per_client=data["limits"]["max_fills_per_client"],
        client_upstream_per_minute=data["limits"]["client_upstream_per_minute"],
        referrers_max_bytes=data["limits"]["referrers_max_bytes"],
        referrers_max_descriptors=data["limits"]["referrers_max_descriptors"],
        referrers_fetches=data["limits"]["referrers_fetches"],
        gc=GcSettings(
            interval=data["gc"]["interval"],
            delay=data["gc"]["delay"],
            keep_pulled_within=data["gc"]["keep_pulled_within"],
            max_size=data["gc"]["max_size"],
            low_watermark=data["gc"]["low_watermark"],
            pins=tuple(data["gc"]["pins"]),
        ),
        follow=FollowSettings(
            images=tuple(
                FollowRule(rule["image"], tuple(rule["platforms"]), rule["interval"])
                for rule in data["follow"]["images"]
            ),
            interval=data["follow"]["interval"],
            pulled_within=data["follow"]["pulled_within"],
            quota_reserve=data["follow"]["quota_reserve"],
            keep_previous=data["follow"]["keep_previous"],
            tick=data["follow"]["tick"],
            max_bytes=data["follow"]["max_bytes"],
        ),
    )


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Settings from the file named by PULLTHROUGH_CONFIG (or the defaults without one)."""
    env = dict(os.environ if env is None else env)
    path = env.get("PULLTHROUGH_CONFIG")
    raw: Any = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError([f"PULLTHROUGH_CONFIG: cannot read {path}: {exc.strerror}"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"PULLTHROUGH_CONFIG: {path} is not valid YAML: {exc}"]) from None
    return settings_from_mapping(raw, env)


def load_settings_or_report(env: dict[str, str] | None = None) -> Settings | None:
    """For command lines: the settings, or None after printing every problem to stderr."""
    try:
        return load_settings(env)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _local_cache(raw: dict | None) -> LocalCacheSettings | None:
    if raw is None:
        return None
    return LocalCacheSettings(
        path=Path(raw["path"]).resolve(),
        max_size=raw["max_size"],
        low_watermark=raw["low_watermark"],
    )
