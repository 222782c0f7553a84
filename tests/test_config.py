"""Configuration: validated at start with every problem named by its key path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


def test_check_config_exits_non_zero_and_names_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("registries:\n  - name: docker.io\n    url: not-a-url\n")
    result = subprocess.run(
        [sys.executable, "-m", "registry", "check-config"],
        cwd=ROOT,
        env={"PULLTHROUGH_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "registries.0.url" in result.stderr


def test_unreadable_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError):
        load_settings({"PULLTHROUGH_CONFIG": str(tmp_path / "missing.yaml")})
