"""Configuration: the settings (settings.py, where every default is), the file's schema
(schema.py) and its loading (loading.py). Only re-exports; the loading's names (which bring
marshmallow and YAML) on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from registry.config.settings import (
    DEFAULT_REGISTRY,
    DOCKER_HUB_URL,
    AccessRule,
    AuthSettings,
    Credentials,
    FollowRule,
    FollowSettings,
    Gate,
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
    VerifyMode,
    VerifyRule,
)

if TYPE_CHECKING:
    from registry.config.loading import (
        ConfigError,
        config_warnings,
        load_credentials_file,
        load_settings,
        load_settings_or_report,
        settings_from_mapping,
    )

_LOADING = {
    "ConfigError",
    "config_warnings",
    "load_credentials_file",
    "load_settings",
    "load_settings_or_report",
    "settings_from_mapping",
}

__all__ = [
    "DEFAULT_REGISTRY",
    "DOCKER_HUB_URL",
    "AccessRule",
    "AuthSettings",
    "ConfigError",
    "Credentials",
    "FollowRule",
    "FollowSettings",
    "Gate",
    "GcSettings",
    "HostsSettings",
    "LimitsSettings",
    "LocalCacheSettings",
    "RegistrySettings",
    "S3Settings",
    "Settings",
    "TagRule",
    "TlsSettings",
    "UpstreamSettings",
    "VerifyMode",
    "VerifyRule",
    "config_warnings",
    "load_credentials_file",
    "load_settings",
    "load_settings_or_report",
    "settings_from_mapping",
]


def __getattr__(name: str) -> Any:
    if name in _LOADING:
        from registry.config import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'registry.config' has no attribute {name!r}")
