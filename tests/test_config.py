"""Configuration: validated at start with every problem named by its key path."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from registry.config import ConfigError, load_settings, settings_from_mapping
from tests.support.servers import ROOT


def test_defaults_describe_the_users_docker_hub_setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = settings_from_mapping({}, env={})
    assert settings.registries[0].name == "docker.io"
    assert settings.registries[0].url == "https://registry-1.docker.io"
    assert settings.storage_root == tmp_path / "data"


def test_every_problem_is_listed_with_its_key_path():
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(
            {
                "storage": {"root": 5},
                "registries": [{"name": "docker.io", "url": "ftp://x"}, {"url": "http://y"}],
                "upstream": {"read_timeout": -1},
            },
            env={},
        )
    problems = "\n".join(caught.value.problems)
    assert "storage.root:" in problems
    assert "registries.0.url:" in problems
    assert "registries.1.name:" in problems
    assert "upstream.read_timeout:" in problems


def test_redis_url_from_the_environment_wins():
    settings = settings_from_mapping(
        {"redis": {"url": "redis://a:1/0"}}, env={"REDIS_URL": "redis://b:2/0"}
    )
    assert settings.redis_url == "redis://b:2/0"


def test_credentials_file_in_the_zot_shape_is_used_and_never_shown(tmp_path):
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"registry-1.docker.io": {"username": "me", "password": "s3cret"}}))
    settings = settings_from_mapping({"credentials_file": str(creds)}, env={})
    assert settings.registries[0].credentials.username == "me"
    assert "s3cret" not in repr(settings)


def check_config(config) -> subprocess.CompletedProcess:
    """`python -m registry check-config` of the file `config`, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "registry", "check-config"],
        cwd=ROOT,
        env={"PULLTHROUGH_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


def test_check_config_exits_non_zero_and_names_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("registries:\n  - name: docker.io\n    url: not-a-url\n")
    result = check_config(config)
    assert result.returncode == 2
    assert "registries.0.url" in result.stderr


def test_check_config_warns_of_a_verify_rule_that_can_match_no_repository(tmp_path):
    """`Alpine` (uppercase), `alpine` on Docker Hub (official images are `library/alpine`)
    and a glob that names the registry would leave every image of theirs unchecked."""
    from tests.support.cosign import Key

    key = Key.generate().public_pem
    rules = ["Alpine", "alpine", "docker.io/library/*", "library/*", "*", "team/app-[0-9]*"]
    config = tmp_path / "verify.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "registries": [
                    {
                        "name": "docker.io",
                        "url": "https://registry-1.docker.io",
                        "verify": [{"repositories": r, "cosign_keys": [key]} for r in rules],
                    }
                ]
            }
        )
    )
    result = check_config(config)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3, result.stdout
    assert "'Alpine' can match no repository" in warnings[0]
    assert "library/alpine" in warnings[1]
    assert "names the registry" in warnings[2]


def test_unreadable_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError):
        load_settings({"PULLTHROUGH_CONFIG": str(tmp_path / "missing.yaml")})


def test_the_shipped_example_config_is_valid():
    settings = load_settings({"PULLTHROUGH_CONFIG": str(ROOT / "deploy" / "config.example.yaml")})
    hub = settings.registry("docker.io")
    assert hub.ttl_of("library/alpine", "3.20.3") == 86400
    assert hub.ttl_of("library/alpine", "latest") == hub.tag_ttl


def test_tag_ttl_rules_first_match_wins_and_immutable_never_expires():
    settings = settings_from_mapping(
        {
            "registries": [
                {
                    "name": "docker.io",
                    "tag_ttl": 60,
                    "tag_ttl_overrides": [
                        {"match": "*:sha-*", "immutable": True},
                        {"match": "library/*", "ttl": 5},
                        {"match": "library/*:*", "ttl": 3600},
                    ],
                }
            ]
        },
        env={},
    )
    hub = settings.registry("docker.io")
    assert hub.ttl_of("team/app", "sha-1234") == math.inf
    # `*` spans "/" and ":" too, so the earlier, broader rule wins.
    assert hub.ttl_of("library/redis", "7") == 5
    assert hub.ttl_of("team/app", "latest") == 60


@pytest.mark.parametrize(
    "rule", [{"match": "x"}, {"match": "x", "ttl": 5, "immutable": True}, {"ttl": 5}]
)
def test_a_tag_rule_needs_a_match_and_exactly_one_of_ttl_or_immutable(rule):
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(
            {"registries": [{"name": "docker.io", "tag_ttl_overrides": [rule]}]}, env={}
        )
    assert "registries.0.tag_ttl_overrides.0." in "\n".join(caught.value.problems)


def test_s3_storage_is_configured_with_its_key_paths_checked():
    settings = settings_from_mapping(
        {
            "storage": {
                "driver": "s3",
                "s3": {
                    "bucket": "cache",
                    "endpoint": "http://127.0.0.1:9000",
                    "access_key": "AK",
                    "secret_key": "very-secret",
                    "part_size": "16MiB",
                    "redirect": True,
                    "redirect_ttl": "10m",
                },
            }
        },
        env={},
    )
    assert settings.s3.bucket == "cache" and settings.s3.part_size == 16 << 20
    assert settings.s3.redirect_ttl == 600
    assert "very-secret" not in repr(settings)
    assert settings_from_mapping({}, env={}).s3 is None

    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(
            {
                "storage": {
                    "driver": "s3",
                    "s3": {
                        "bucket": "cache",
                        "endpoint": "ftp://x",
                        "access_key": "AK",
                        "part_size": "1MiB",
                    },
                }
            },
            env={},
        )
    problems = "\n".join(caught.value.problems)
    assert "storage.s3.endpoint" in problems
    assert "storage.s3.part_size" in problems
    assert "storage.s3.access_key: access_key and secret_key go together." in problems
    with pytest.raises(ConfigError, match=r"storage\.s3: driver s3 needs"):
        settings_from_mapping({"storage": {"driver": "s3"}}, env={})


def test_an_s3_nodes_local_tier_is_configured_and_not_combined_with_redirect(tmp_path):
    s3 = {"bucket": "cache", "local_cache": {"path": str(tmp_path), "max_size": "10GiB"}}
    settings = settings_from_mapping({"storage": {"driver": "s3", "s3": s3}}, env={})
    tier = settings.s3.local_cache
    assert (tier.path, tier.max_size, tier.low_watermark) == (tmp_path, 10 << 30, 0.8)
    with pytest.raises(ConfigError, match=r"redirect and local_cache are not combined"):
        settings_from_mapping({"storage": {"driver": "s3", "s3": {**s3, "redirect": True}}}, env={})
    with pytest.raises(ConfigError, match=r"storage\.s3\.local_cache\.max_size"):
        settings_from_mapping(
            {"storage": {"driver": "s3", "s3": {**s3, "local_cache": {"path": "x"}}}}, env={}
        )


def test_redis_sentinels_are_host_port_pairs():
    settings = settings_from_mapping(
        {"redis": {"sentinels": ["10.0.0.1:26379", "sentinel-b:26380"], "master": "cache"}},
        env={},
    )
    assert settings.redis_sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26380))
    assert settings.redis_master == "cache"
    with pytest.raises(ConfigError, match=r"redis\.sentinels\.1: Not host:port"):
        settings_from_mapping({"redis": {"sentinels": ["a:1", "no-port"]}}, env={})


def test_the_sentinel_password_comes_from_the_file_or_the_environment():
    raw = {"redis": {"sentinels": ["a:1"], "sentinel_password": "from-file"}}
    assert settings_from_mapping(raw, env={}).redis_sentinel_password == "from-file"
    settings = settings_from_mapping(raw, env={"REDIS_SENTINEL_PASSWORD": "from-env"})
    assert settings.redis_sentinel_password == "from-env"
    assert "from-env" not in repr(settings)  # settings may be logged, secrets never


# Each section's schema and the settings dataclass its keys land in (RedisSchema's and
# StorageSchema's keys land in Settings under other names: SECTION_NAMES).
SECTIONS = {
    "UpstreamSchema": "UpstreamSettings",
    "LimitsSchema": "LimitsSettings",
    "GcSchema": "GcSettings",
    "FollowSchema": "FollowSettings",
    "FollowRuleSchema": "FollowRule",
    "HostsSchema": "HostsSettings",
    "RegistrySchema": "RegistrySettings",
    "S3Schema": "S3Settings",
    "LocalCacheSchema": "LocalCacheSettings",
    "TagRuleSchema": "TagRule",
    "VerifySchema": "VerifyRule",
    "RedisSchema": "Settings",
    "StorageSchema": "Settings",
    "ServerSchema": "Settings",
    "SettingsSchema": "Settings",
}
SECTION_NAMES = {
    ("RedisSchema", "url"): "redis_url",
    ("RedisSchema", "sentinels"): "redis_sentinels",
    ("RedisSchema", "master"): "redis_master",
    ("RedisSchema", "sentinel_password"): "redis_sentinel_password",
    ("StorageSchema", "root"): "storage_root",
    ("StorageSchema", "min_free"): "min_free_bytes",
    ("StorageSchema", "file_mode"): "storage_file_mode",
    ("ServerSchema", "hosts"): "server_hosts",
    ("RegistrySchema", "tag_ttl_overrides"): "tag_rules",
}


def _defaults(cls) -> dict[str, object]:
    import dataclasses

    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def test_every_setting_has_its_default_in_one_place():
    """A setting's default is written once, in registry/config/settings.py: no schema field
    repeats one, and no constructor in registry/ or workers/ takes a parameter named like a
    setting with a default of its own (it may name the setting's: `S3Settings.part_size`).
    `upstream.parallel_ranges` once had three defaults, two of them different."""
    import ast
    import dataclasses

    from marshmallow.utils import missing

    from registry.config import schema, settings

    twice = []
    for schema_name, settings_name in SECTIONS.items():
        fields = getattr(schema, schema_name)().fields
        defaults = _defaults(getattr(settings, settings_name))
        for key, field in fields.items():
            name = SECTION_NAMES.get((schema_name, key), key)
            if field.load_default is not missing and name in defaults:
                twice.append(f"{schema_name}.{key} and {settings_name}.{name}")
    assert not twice, twice

    setting_names = {
        f.name
        for cls in vars(settings).values()
        if dataclasses.is_dataclass(cls) and isinstance(cls, type)
        for f in dataclasses.fields(cls)
        if f.name in _defaults(cls) and f.name not in ("gc", "follow", "verify", "hosts")
    }
    repeated = []
    for path in sorted([*(ROOT / "registry").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]):
        if path.parent.name == "config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = [
                *zip(
                    positional[len(positional) - len(args.defaults) :], args.defaults, strict=True
                ),
                *(
                    (a, d)
                    for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
                    if d is not None
                ),
            ]
            for arg, default in pairs:
                named = isinstance(default, ast.Attribute) and default.attr == arg.arg
                none = isinstance(default, ast.Constant) and default.value is None
                if arg.arg in setting_names and not (named or none):
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    repeated.append(f"{where} {node.name}({arg.arg}={ast.unparse(default)})")
    assert not repeated, repeated
