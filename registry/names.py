"""Repository names, tags and the routing of a request to one configured upstream registry.

Names follow the distribution reference grammar, which admits no `..`, no leading `/`, no
uppercase and no NUL: a validated name is safe as a relative path under the storage root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.config import RegistrySettings, Settings
from registry.errors import ManifestUnknown, NameInvalid, NameUnknown

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_NAME_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Target:
    """A repository at one upstream: where to fetch from and where to file it locally."""

    registry: RegistrySettings
    repository: str

    def __str__(self) -> str:
        return f"{self.registry.name}/{self.repository}"


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise NameInvalid(detail={"name": name[:300]})
    return name


def validate_tag(tag: str) -> str:
    """A pulled reference that is no valid tag names no manifest: 404, asked of nobody
    (TAG_INVALID is for pushes; the spec wants a manifest that is not found to be a 404)."""
    if not _TAG.fullmatch(tag):
        raise ManifestUnknown(
            "the reference is neither a valid tag nor a digest", detail={"reference": tag[:300]}
        )
    return tag


def resolve(settings: Settings, name: str, ns: str | None) -> Target:
    """Map a request's repository name (and containerd's `ns` parameter) to a Target.

    `?ns=<registry>` names the upstream directly. Otherwise a first path component that is a
    configured registry name selects that registry (`ghcr.io/org/app`); anything else belongs
    to the default registry. Docker Hub's single-component names live under `library/`.
    """
    validate_name(name)
    if ns is not None:
        registry = settings.registry(ns)
        if registry is None:
            raise NameUnknown(
                f"registry {ns[:100]!r} is not configured on this cache",
                detail={"ns": ns[:300]},
            )
        repository = name
    else:
        first, _, rest = name.partition("/")
        registry = settings.registry(first) if rest else None
        if registry is not None:
            repository = rest
        else:
            registry = settings.registry(settings.default_registry)
            assert registry is not None  # guaranteed by config validation
            repository = name
    if registry.name == "docker.io" and "/" not in repository:
        repository = f"library/{repository}"
    return Target(registry, repository)


def catalog_name(default_registry: str, stored: str) -> str:
    """`docker.io/library/x` lists as `library/x`; other registries keep their prefix,
    which is also the path-prefix route, so every catalog name can be pulled as listed."""
    prefix = f"{default_registry}/"
    return stored[len(prefix) :] if stored.startswith(prefix) else stored
