"""The configuration file's schema: marshmallow validation of every key, with its key path in
each problem. No defaults here (settings.py holds them): a key left out is left out."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from marshmallow import Schema, ValidationError, fields, pre_load, validate, validates_schema

from registry.config.settings import DEFAULT_REGISTRY, Gate, VerifyMode
from registry.hostnames import split_host
from registry.names import REGISTRY_NAME


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
    name = fields.String(required=True, validate=validate.Regexp(REGISTRY_NAME))
    url = fields.String(load_default=None, validate=_url)
    username = fields.String(load_default=None)
    password = fields.String(load_default=None)
    tls_verify = fields.Boolean()
    ca_bundle = fields.String(load_default=None)
    redirect_allow = fields.List(fields.String(validate=validate.Length(min=1)))
    tag_ttl = fields.Float(validate=validate.Range(min=0))
    tag_ttl_overrides = fields.List(fields.Nested(TagRuleSchema))
    referrers_ttl = fields.Float(validate=validate.Range(min=0))
    verify = fields.List(fields.Nested(VerifySchema))

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
    low_watermark = fields.Float(validate=validate.Range(min=0.1, max=1.0))


class S3Schema(Schema):
    bucket = fields.String(required=True, validate=validate.Length(min=3, max=63))
    endpoint = fields.String(validate=_url)
    region = fields.String()
    access_key = fields.String()
    secret_key = fields.String()
    prefix = fields.String()
    path_style = fields.Boolean()
    tls_verify = fields.Boolean()
    ca_bundle = fields.String(load_default=None)
    part_size = ByteSize(validate=validate.Range(min=5 << 20, max=5 << 30))
    redirect = fields.Boolean(load_default=False)
    redirect_ttl = Duration(validate=validate.Range(min=10, max=7 * 86400))
    local_cache = fields.Nested(LocalCacheSchema)
    lookup_ttl = Duration(validate=validate.Range(min=0, max=3600))

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
    root = fields.String()
    min_free = ByteSize(validate=validate.Range(min=0))
    file_mode = fields.String(
        validate=validate.Regexp(r"0?[0-7]{3}", error="An octal file mode such as 0640."),
    )
    s3 = fields.Nested(S3Schema)

    @validates_schema
    def _s3_needs_bucket(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("driver") == "s3" and not data.get("s3"):
            raise ValidationError("driver s3 needs storage.s3 with at least a bucket.", "s3")


class RedisSchema(Schema):
    url = fields.String()
    sentinels = fields.List(
        fields.String(validate=validate.Regexp(r"[^\s:]+:[0-9]{1,5}", error="Not host:port.")),
    )
    master = fields.String(validate=validate.Length(min=1))
    sentinel_password = fields.String()


class UpstreamSchema(Schema):
    connect_timeout = fields.Float(validate=validate.Range(min=0.1))
    read_timeout = fields.Float(validate=validate.Range(min=0.1))
    parallel_ranges = fields.Integer(validate=validate.Range(min=1, max=16))
    range_min_size = ByteSize(validate=validate.Range(min=1 << 20))
    metadata_timeout = fields.Float(validate=validate.Range(min=0.1))
    lease_ttl = fields.Float(validate=validate.Range(min=1))
    negative_ttl = fields.Float(validate=validate.Range(min=0))
    breaker_failures = fields.Integer(validate=validate.Range(min=1))
    breaker_window = fields.Float(validate=validate.Range(min=1))
    breaker_backoff = fields.Float(validate=validate.Range(min=0.1))
    breaker_probe_interval = fields.Float(validate=validate.Range(min=0.1))
    rate_limit_max_backoff = Duration(validate=validate.Range(min=1))
    max_stale = Duration(allow_none=True, validate=validate.Range(min=0))


class LimitsSchema(Schema):
    max_fills = fields.Integer(validate=validate.Range(min=1))
    max_fills_per_client = fields.Integer(validate=validate.Range(min=0))
    client_upstream_per_minute = fields.Integer(validate=validate.Range(min=0))
    referrers_max_bytes = ByteSize(validate=validate.Range(min=64 * 1024))
    referrers_max_descriptors = fields.Integer(validate=validate.Range(min=1))
    referrers_fetches = fields.Integer(validate=validate.Range(min=1))


class GcSchema(Schema):
    interval = Duration(validate=validate.Range(min=1))
    delay = Duration(validate=validate.Range(min=0))
    keep_pulled_within = Duration(validate=validate.Range(min=60))
    max_size = ByteSize(validate=validate.Range(min=1))
    low_watermark = fields.Float(validate=validate.Range(min=0.1, max=1))
    pins = fields.List(fields.String(validate=validate.Length(min=1)))


class FollowRuleSchema(Schema):
    image = fields.String(required=True, validate=validate.Length(min=3, max=300))
    platforms = fields.List(fields.String(validate=validate.Length(min=1)))
    interval = Duration(validate=validate.Range(min=10))

    @validates_schema
    def _pattern(self, data: dict[str, Any], **_: Any) -> None:
        from registry.follow import parse_pattern

        try:
            parse_pattern(data.get("image", ""))
        except ValueError as exc:
            raise ValidationError(str(exc), "image") from None


class FollowSchema(Schema):
    images = fields.List(fields.Nested(FollowRuleSchema))
    interval = Duration(validate=validate.Range(min=10))
    pulled_within = Duration(validate=validate.Range(min=60))
    quota_reserve = fields.Float(validate=validate.Range(min=0, max=1))
    keep_previous = fields.Integer(validate=validate.Range(min=0, max=10))
    tick = Duration(validate=validate.Range(min=1))
    max_bytes = ByteSize(validate=validate.Range(min=1))


class HostsSchema(Schema):
    stale_after = Duration(validate=validate.Range(min=60))
    max = fields.Integer(validate=validate.Range(min=1, max=100_000))
    names = fields.Dict(
        keys=fields.String(validate=validate.Length(min=1, max=64)),
        values=fields.String(validate=validate.Length(min=1, max=64)),
    )


def _host_entry(value: str) -> None:
    if split_host(value) is None:
        raise ValidationError(f"{value!r} is not a host name, host:port or .domain.")


class TlsSchema(Schema):
    cert = fields.String(required=True)
    key = fields.String(required=True)
    client_ca = fields.String()


class ServerSchema(Schema):
    # `name`, `name:port`, `.domain` (registry/hostnames.py).
    hosts = fields.List(fields.String(validate=_host_entry))
    tls = fields.Nested(TlsSchema)
    plain = fields.Boolean()

    @validates_schema
    def _plain_beside_client_certificates(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("tls", {}).get("client_ca") and "plain" not in data:
            raise ValidationError(
                "server.tls.client_ca admits only clients with a certificate, but plain HTTP on "
                "the same port would serve anyone: set server.plain: false (or true to accept "
                "that).",
                "plain",
            )
        if data.get("plain") is False and "tls" not in data:
            raise ValidationError("server.plain: false needs server.tls.", "plain")


def _network(value: str) -> None:
    import ipaddress

    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValidationError(f"{value!r} is not a network (CIDR: 10.0.0.0/8, fd00::/8)") from None


USER = fields.String(validate=validate.Regexp(r"^[^\s:]{1,64}$", error="not a user name"))


class AccessRuleSchema(Schema):
    repositories = fields.List(fields.String(validate=validate.Length(min=1, max=255)),
                               required=True, validate=validate.Length(min=1))  # fmt: skip
    users = fields.List(USER)
    groups = fields.List(fields.String(validate=validate.Length(min=1, max=64)))

    @validates_schema
    def _someone(self, data: dict[str, Any], **_: Any) -> None:
        if not data.get("users") and not data.get("groups"):
            raise ValidationError("a rule names users or groups (or both).", "users")


class AuthSchema(Schema):
    htpasswd = fields.String()
    anonymous = fields.Boolean()
    allow_networks = fields.List(fields.String(validate=_network))
    groups = fields.Dict(keys=fields.String(validate=validate.Length(min=1, max=64)),
                         values=fields.List(USER))  # fmt: skip
    access = fields.List(fields.Nested(AccessRuleSchema))
    admins = fields.List(fields.String(validate=validate.Length(min=1, max=64)))
    ui = fields.Enum(Gate, by_value=True)
    metrics = fields.Enum(Gate, by_value=True)
    metrics_token_file = fields.String()
    token_ttl = fields.Integer(validate=validate.Range(min=30, max=86400))
    max_failed_logins = fields.Integer(validate=validate.Range(min=1, max=10_000))

    @validates_schema
    def _someone_may_pull(self, data: dict[str, Any], **_: Any) -> None:
        if not (data.get("htpasswd") or data.get("anonymous") or data.get("allow_networks")):
            raise ValidationError(
                "no one could pull: give auth.htpasswd (logins), auth.allow_networks or "
                "auth.anonymous: true (client certificates alone: server.tls.client_ca, "
                "without an auth section).",
                "htpasswd",
            )


class SettingsSchema(Schema):
    server = fields.Nested(ServerSchema)
    auth = fields.Nested(AuthSchema)
    limits = fields.Nested(LimitsSchema)
    storage = fields.Nested(StorageSchema)
    redis = fields.Nested(RedisSchema)
    upstream = fields.Nested(UpstreamSchema)
    gc = fields.Nested(GcSchema)
    follow = fields.Nested(FollowSchema)
    hosts = fields.Nested(HostsSchema)
    credentials_file = fields.String()
    default_registry = fields.String()
    registries = fields.List(fields.Nested(RegistrySchema), validate=validate.Length(min=1))

    @validates_schema
    def _registries(self, data: dict[str, Any], **_: Any) -> None:
        names = [r["name"] for r in data.get("registries", [{"name": DEFAULT_REGISTRY}])]
        if len(names) != len(set(names)):
            raise ValidationError("registry names must be unique.", "registries")
        if data.get("default_registry", DEFAULT_REGISTRY) not in names:
            raise ValidationError("must name one of the configured registries.", "default_registry")
