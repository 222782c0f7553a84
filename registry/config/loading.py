"""Loading the configuration: the YAML file validated (schema.py) into settings (settings.py),
with every problem reported by its key path and nothing started half-configured.

The file's path comes from `PULLTHROUGH_CONFIG`; without it the defaults describe the
user's setup (Docker Hub, data under ./data). `REDIS_URL` in the environment overrides
`redis.url` so `make run` can hand over its private Redis (`REDIS_SENTINEL_PASSWORD` likewise
overrides `redis.sentinel_password`), and `PULLTHROUGH_STORAGE_ROOT` overrides
`storage.root` (the container image points it at its volume).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from marshmallow import ValidationError

from registry.config.schema import RegistrySchema, SettingsSchema, _pem_or_file
from registry.config.settings import (
    DEFAULT_REGISTRY,
    DOCKER_HUB_URL,
    REDIRECT_TTL,
    AccessRule,
    AuthSettings,
    Credentials,
    FollowRule,
    FollowSettings,
    GcSettings,
    HostsSettings,
    LimitsSettings,
    LocalCacheSettings,
    RegistrySettings,
    S3Settings,
    Settings,
    TagRule,
    TlsSettings,
    UpstreamSettings,
    VerifyRule,
)

log = logging.getLogger("registry.config")


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every one with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


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


def _given(cls: type, data: Mapping[str, Any], **keys: str) -> dict[str, Any]:
    """The fields of dataclass `cls` that `data` gives (a key named otherwise in the file is
    mapped by `keys`: field=key); the rest keep their defaults (settings.py)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for name in names:
        key = keys.get(name, name)
        if key in data:
            out[name] = data[key]
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
    if data.get("credentials_file"):
        from_file = load_credentials_file(data["credentials_file"])
    # No registries: the default one, with whatever credentials the file has for it.
    entries = data.get("registries") or [RegistrySchema().load({"name": DEFAULT_REGISTRY})]
    given: dict[str, Any] = {"registries": tuple(_registry(entry, from_file) for entry in entries)}
    storage = data.get("storage", {})
    redis = data.get("redis", {})
    if "default_registry" in data:
        given["default_registry"] = data["default_registry"]
    if "min_free" in storage:
        given["min_free_bytes"] = storage["min_free"]
    if "file_mode" in storage:
        given["storage_file_mode"] = int(storage["file_mode"], 8)
    if storage.get("driver") == "s3":
        given["s3"] = _s3(storage["s3"])
    root = env.get("PULLTHROUGH_STORAGE_ROOT") or storage.get("root")
    given["storage_root"] = Path(root or Settings.storage_root).resolve()
    for name, key in (
        ("redis_url", "url"),
        ("redis_master", "master"),
        ("redis_sentinel_password", "sentinel_password"),
    ):
        if key in redis:
            given[name] = redis[key]
    if "sentinels" in redis:
        given["redis_sentinels"] = tuple(_host_port(entry) for entry in redis["sentinels"])
    if env.get("REDIS_URL"):
        given["redis_url"] = env["REDIS_URL"]
    if env.get("REDIS_SENTINEL_PASSWORD"):
        given["redis_sentinel_password"] = env["REDIS_SENTINEL_PASSWORD"]
    server = data.get("server", {})
    if "hosts" in server:
        given["server_hosts"] = tuple(server["hosts"])
    if "tls" in server:
        given["server_tls"] = _tls(server["tls"])
    if "plain" in server:
        given["server_plain"] = server["plain"]
    if "auth" in data:
        given["auth"] = _auth(data["auth"])
    given["upstream"] = UpstreamSettings(**_given(UpstreamSettings, data.get("upstream", {})))
    given["limits"] = LimitsSettings(**_given(LimitsSettings, data.get("limits", {})))
    gc = _given(GcSettings, data.get("gc", {}))
    if "pins" in gc:
        gc["pins"] = tuple(gc["pins"])
    given["gc"] = GcSettings(**gc)
    follow = _given(FollowSettings, data.get("follow", {}))
    if "images" in follow:
        follow["images"] = tuple(_follow_rule(rule) for rule in follow["images"])
    given["follow"] = FollowSettings(**follow)
    hosts = _given(HostsSettings, data.get("hosts", {}))
    if "names" in hosts:
        hosts["names"] = tuple(sorted(hosts["names"].items()))
    given["hosts"] = HostsSettings(**hosts)
    return Settings(**given)


def _registry(entry: dict[str, Any], from_file: dict[str, Credentials]) -> RegistrySettings:
    name = entry["name"]
    url = entry["url"] or (DOCKER_HUB_URL if name == "docker.io" else f"https://{name}")
    host = urlsplit(url).netloc
    creds = None
    if entry["username"] is not None:
        creds = Credentials(entry["username"], entry["password"])
    else:
        # Keyed by the URL's host, or by the registry's name only while the URL is that
        # registry's own (a docker.io password never goes to a mirror configured as
        # docker.io's URL).
        own_host = urlsplit(DOCKER_HUB_URL).netloc if name == "docker.io" else None
        by_name = host in (name, own_host)
        creds = from_file.get(host) or (from_file.get(name) if by_name else None)
    given = _given(RegistrySettings, entry, tag_rules="tag_ttl_overrides")
    if entry["ca_bundle"]:
        given["tls_verify"] = entry["ca_bundle"]
    if "redirect_allow" in given:
        given["redirect_allow"] = tuple(h.lower() for h in given["redirect_allow"])
    if "tag_rules" in given:
        given["tag_rules"] = tuple(
            TagRule(rule["match"], math.inf if rule["immutable"] else rule["ttl"])
            for rule in given["tag_rules"]
        )
    if "verify" in given:
        given["verify"] = tuple(_verify_rule(rule) for rule in given["verify"])
    return RegistrySettings(**{**given, "name": name, "url": url.rstrip("/"), "credentials": creds})


def _readable(section: str, raw: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Path]:
    """The files of a section, each checked readable now (the workers read them later)."""
    paths = {key: Path(raw[key]).resolve() for key in keys if key in raw}
    for key, path in paths.items():
        try:
            path.read_bytes()
        except OSError as exc:
            raise ConfigError([f"{section}.{key}: cannot read {path}: {exc.strerror}"]) from None
    return paths


def _auth(raw: dict[str, Any]) -> AuthSettings:
    given = _given(AuthSettings, raw)
    given.update(_readable("auth", raw, ("htpasswd", "metrics_token_file")))
    for key in ("allow_networks", "admins"):
        if key in given:
            given[key] = tuple(given[key])
    if "groups" in given:
        given["groups"] = tuple(sorted((g, tuple(users)) for g, users in given["groups"].items()))
    if "access" in given:
        given["access"] = tuple(
            AccessRule(
                repositories=tuple(rule["repositories"]),
                users=tuple(rule.get("users", ())),
                groups=tuple(rule.get("groups", ())),
            )
            for rule in given["access"]
        )
    return AuthSettings(**given)


def _tls(raw: dict[str, Any]) -> TlsSettings:
    return TlsSettings(**_readable("server.tls", raw, ("cert", "key", "client_ca")))


def _s3(raw: dict[str, Any]) -> S3Settings:
    given = _given(S3Settings, raw)
    if raw["ca_bundle"]:
        given["tls_verify"] = raw["ca_bundle"]
    given["redirect_ttl"] = int(raw.get("redirect_ttl", REDIRECT_TTL)) if raw["redirect"] else 0
    if "local_cache" in raw:
        cache = raw["local_cache"]
        given["local_cache"] = LocalCacheSettings(
            **{**_given(LocalCacheSettings, cache), "path": Path(cache["path"]).resolve()}
        )
    return S3Settings(**given)


def _follow_rule(raw: dict[str, Any]) -> FollowRule:
    given = _given(FollowRule, raw)
    if "platforms" in given:
        given["platforms"] = tuple(given["platforms"])
    return FollowRule(**given)


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
