"""Follow patterns: which tags `follow.images` names (pure; the follower is in
registry/pullthrough/follower.py).

`[registry/]repository:tag`. The repository may be a glob (`immich-app/*`: matched against the
repositories the cache holds, since registries do not list theirs); the tag a literal, a glob
(`16*`), or a version range (`>=7 <8`, `~=3.19`). No wildcard matches `/`. A range is PEP 440
comparisons over tags that are versions (`7.2.4` matches, `7.2-alpine` and `latest` never do;
pre-releases neither).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

_GLOB = re.compile(r"[*?\[]")
_RANGE_START = ("<", ">", "=", "!", "~")


@dataclass(frozen=True)
class Pattern:
    name: str  # [registry/]repository, maybe a glob
    tag: str  # a literal, a glob, or the text of a version range
    versions: SpecifierSet | None = None

    @property
    def name_is_glob(self) -> bool:
        return bool(_GLOB.search(self.name))

    @property
    def tag_is_literal(self) -> bool:
        return self.versions is None and not _GLOB.search(self.tag)

    def matches_tag(self, tag: str) -> bool:
        if self.versions is None:
            return glob_matches(self.tag, tag)
        try:
            version = Version(tag)
        except InvalidVersion:
            return False
        # Version("v7") parses too; only tags written as plain numbers are versions here.
        return tag[:1].isdigit() and self.versions.contains(version)

    def matches_name(self, name: str) -> bool:
        return glob_matches(self.name, name)


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    """A shell glob as a regex in which no wildcard matches `/`: `library/*` is the
    repositories directly under `library/`, and `1*` never matches `1/../x`."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and (end := pattern.find("]", i + 2)) > 0:
            inner = pattern[i + 1 : end]
            negate = inner[:1] in ("!", "^")
            body = re.escape(inner[1:] if negate else inner).replace("\\-", "-")
            out.append(f"[^/{body}]" if negate else f"(?!/)[{body}]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out))


def glob_matches(pattern: str, text: str) -> bool:
    return _glob(pattern).fullmatch(text) is not None


def parse_pattern(text: str) -> Pattern:
    """`name:tag` as in `follow.images`; ValueError saying what is wrong."""
    text = text.strip()
    slash = text.rfind("/")
    colon = text.find(":", slash + 1)
    if colon <= 0 or colon == len(text) - 1:
        raise ValueError(f"{text!r}: give an image and a tag, `name:tag` (a glob or a range)")
    name, tag = text[:colon], text[colon + 1 :].strip()
    if tag.startswith(_RANGE_START):
        try:
            versions = SpecifierSet(",".join(tag.replace(",", " ").split()))
        except InvalidSpecifier:
            raise ValueError(f"{text!r}: {tag!r} is not a version range (`>=7 <8`)") from None
        return Pattern(name, tag, versions)
    if not re.fullmatch(r"[A-Za-z0-9_.*?\[\]-]{1,128}", tag):
        raise ValueError(f"{text!r}: {tag!r} is neither a tag nor a glob of tags")
    return Pattern(name, tag)


def spread(member: str, interval: float) -> float:
    """Where in each interval a followed tag is checked: the same for every scheduler and
    every run, different for each tag, so that checks do not come in one burst."""
    digest = hashlib.sha256(member.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * interval


class FollowState(StrEnum):
    """Where a followed tag stands after its last check."""

    WAITING = "waiting"  # not checked yet
    CURRENT = "current"  # the cache holds what upstream's tag points to
    FETCHING = "fetching"  # the tag moved: its new manifest and blobs are being fetched
    QUOTA = "quota"  # moved, but upstream's quota is down to the reserve: next interval
    BUDGET = "budget"  # moved, but follow.max_bytes is spent in this window: next interval
    BREAKER = "breaker"  # upstream failing (breaker open): next interval
    MISSING = "missing"  # upstream has no such tag (any more)
    FAILED = "failed"  # the check or the fetch failed: next interval
