"""What an upstream's answers say, parsed as input: its headers (Retry-After, rate limits,
Content-Range, Content-Type), its error bodies, and where it may lead the client."""

from __future__ import annotations

import email.utils
import ipaddress
import json
import re
import time
from collections.abc import Mapping
from urllib.parse import SplitResult

import requests

from registry.digests import looks_like_digest
from registry.numbers import count_or_none, is_count

# The longest upstream Retry-After parsed as one: a day (the breaker caps it further, at
# upstream.rate_limit_max_backoff).
LONGEST_RETRY_AFTER = 86400


def not_global(address: str) -> bool:
    """Not a globally routable unicast address: loopback, private, link-local, shared
    (100.64.0.0/10: CGNAT, Tailscale, a cloud's metadata service), reserved, multicast
    (IPv4-mapped and 6to4/Teredo-embedded IPv4 too)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    return not ip.is_global or ip.is_multicast


def port_of(parts: SplitResult) -> int:
    """The port a URL reaches (its scheme's default when it names none)."""
    return parts.port or (443 if parts.scheme == "https" else 80)


def error_codes(response: requests.Response) -> list[str]:
    """The OCI error codes of a (small) error body; [] when it has none."""
    try:
        # The first 64 KiB only, read or not yet read (streamed responses).
        body = next(response.iter_content(64 * 1024), b"")
        errors = json.loads(body or b"{}")["errors"]
        return [str(error.get("code")) for error in errors if isinstance(error, dict)]
    except Exception:  # not JSON, not the OCI shape, or the read itself failed
        return []


def what(reference: str) -> str:
    return f"manifest {reference}" if looks_like_digest(reference) else f"tag {reference}"


def media_type(response: requests.Response) -> str:
    return response.headers.get("Content-Type", "application/octet-stream").split(";")[0].strip()


def content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """(start, end, total) of `bytes START-END/TOTAL`; None for what is missing or malformed."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (value or "").strip())
    if not match:
        return None, None, None
    return int(match.group(1)), int(match.group(2)), count_or_none(match.group(3))


def unsatisfiable_size(value: str | None) -> int | None:
    """SIZE of a 416's `bytes */SIZE`; None when it is missing or malformed."""
    match = re.fullmatch(r"bytes \*/(\d+)", (value or "").strip())
    return int(match.group(1)) if match else None


def rate_limit_fields(headers: Mapping[str, str]) -> dict[str, str]:
    """Docker Hub's `ratelimit-limit: 100;w=21600`, `ratelimit-remaining: 76;w=21600` and
    `docker-ratelimit-source` as limit, remaining, window and source."""
    fields: dict[str, str] = {}
    for name in ("limit", "remaining"):
        value = headers.get(f"ratelimit-{name}")
        if not value:
            continue
        count, _, params = value.partition(";")
        if is_count(count.strip()):
            fields[name] = count.strip()
        window = re.search(r"\bw=(\d+)", params)
        if window:
            fields["window"] = window.group(1)
    source = headers.get("docker-ratelimit-source")
    if source and fields:
        fields["source"] = source[:100]
    return fields


def retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds from now: a count, or an HTTP date; None for anything else."""
    text = (value or "").strip()
    seconds = count_or_none(text)
    if seconds is not None:
        return float(min(seconds, LONGEST_RETRY_AFTER))
    if not text or len(text) > 64:
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - time.time()), LONGEST_RETRY_AFTER)


def connection_reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "name or service not known" in text or "nodename nor servname" in text or "resolve" in text:
        return "could not be resolved (DNS)"
    if "refused" in text:
        return "refused the connection"
    if "reset" in text:
        return "reset the connection"
    return "could not be reached"
