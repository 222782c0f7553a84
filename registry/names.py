"""Repository names, tags and the routing of a request to one configured upstream registry.

Names follow the distribution reference grammar, which admits no `..`, no leading `/`, no
uppercase and no NUL: a validated name is safe as a relative path under the storage root.
`Repository` and `Tag` are those values as types: their only constructor validates, and the
store and the upstream client take nothing else, so a name from an upstream (a tag list, a
`Link` page) gets the grammar a client's name gets, whoever forgets to check it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from registry.config import RegistrySettings, Settings
from registry.errors import ManifestUnknown, NameInvalid, NameUnknown, TagInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_NAME_LENGTH = 255


class Repository(str):
    """A repository name in the distribution grammar (`library/alpine`); NameInvalid else."""

    __slots__ = ()

    def __new__(cls, value: str) -> Repository:
        if type(value) is cls:
            return value
        if not isinstance(value, str) or len(value) > MAX_NAME_LENGTH or not _NAME.fullmatch(value):
            raise NameInvalid(detail={"name": str(value)[:300]})
        return str.__new__(cls, value)


class Tag(str):
    """A tag in the distribution grammar (`3.20`, at most 128 characters, no `/`); TagInvalid
    else."""

    __slots__ = ()

    def __new__(cls, value: str) -> Tag:
        if type(value) is cls:
            return value
        if not isinstance(value, str) or not _TAG.fullmatch(value):
            raise TagInvalid(detail={"tag": str(value)[:300]})
        return str.__new__(cls, value)


# A configured registry name: a host name, maybe with a port (`docker.io`, `reg.lan:5000`).
REGISTRY_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?")


@lru_cache(maxsize=8192)
def stored_repository(repo: str) -> str:
    """`<registry>/<repository>` as the store files it, checked (NameInvalid else): a
    registry name as the config admits one, then a Repository."""
    registry, sep, name = repo.partition("/")
    if not sep or not REGISTRY_NAME.fullmatch(registry):
        raise NameInvalid(detail={"name": repo[:300]})
    Repository(name)
    return repo


def is_tag(value: object) -> bool:
    """Whether `value` (from anywhere: an upstream's tag list) is a valid tag."""
    return isinstance(value, str) and _TAG.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Target:
    """A repository at one upstream: where to fetch from and where to file it locally."""

    registry: RegistrySettings
    repository: Repository

    def __post_init__(self) -> None:
        object.__setattr__(self, "repository", Repository(self.repository))

    def __str__(self) -> str:
        return f"{self.registry.name}/{self.repository}"


class Route(StrEnum):
    """How a client's request named its registry (the Hosts page shows it per client)."""

    MIRROR = "mirror"  # by the repository alone: Docker's registry-mirrors, a podman mirror
    NAMESPACE = "ns"  # containerd's hosts.toml: ?ns=<registry>
    PREFIX = "prefix"  # the registry's name as the path's first component


def route_of(name: str, ns: str | None, target: Target) -> Route:
    """The route of a request for `name` (with `?ns=`) that resolve() mapped to `target`."""
    if ns is not None:
        return Route.NAMESPACE
    first, _, rest = name.partition("/")
    return Route.PREFIX if rest and first == target.registry.name else Route.MIRROR


def validate_name(name: str) -> Repository:
    return Repository(name)


def validate_tag(tag: str) -> Tag:
    """A pulled reference that is no valid tag names no manifest: 404, asked of nobody
    (TAG_INVALID is for pushes; the spec wants a manifest that is not found to be a 404)."""
    try:
        return Tag(tag)
    except TagInvalid:
        raise ManifestUnknown(
            "the reference is neither a valid tag nor a digest", detail={"reference": tag[:300]}
        ) from None


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
    return Target(registry, Repository(repository))


def catalog_name(default_registry: str, stored: str) -> str:
    """`docker.io/library/x` lists as `library/x`; other registries keep their prefix,
    which is also the path-prefix route, so every catalog name can be pulled as listed."""
    prefix = f"{default_registry}/"
    return stored[len(prefix) :] if stored.startswith(prefix) else stored
