"""The connection to one upstream registry, under its calls (client.py): explicit
(connect, read) timeouts on every request, authentication (anonymous or credentialed bearer
tokens, HTTP Basic), the circuit breaker and rate-limit record it feeds, redirects checked
hop by hop and followed without `Authorization`, bounded reads of small answers, and the
translation of every upstream failure into a RegistryError that names the upstream."""

from __future__ import annotations

import base64
import json
import logging
import math
import socket
import time
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import requests

from registry.config import RegistrySettings, UpstreamSettings
from registry.digests import Digest, parse_or_none
from registry.errors import (
    NameUnknown,
    RegistryError,
    TooManyRequests,
    UpstreamError,
    UpstreamUnavailable,
)
from registry.mediatypes import MANIFEST_TYPES, OCI_INDEX
from registry.metrics import Metrics
from registry.upstream.answers import (
    connection_reason,
    error_codes,
    not_global,
    port_of,
    rate_limit_fields,
    retry_after,
)
from registry.upstream.auth import Challenge, TokenCache, parse_challenge, token_expiry

log = logging.getLogger("registry.upstream.client")

CHUNK_SIZE = 256 * 1024
# A blob's body is read as it comes, up to this at a time: one read of whatever the socket
# holds (a fast upstream's MiB in one step, where 256 KiB steps cost the fill's loop four
# times over; a slow one's few KiB at once, never waiting to fill a buffer).
BLOB_READ = 1024 * 1024
MAX_REDIRECTS = 5
# A token answer is a JWT or two and a few fields: a few KiB.
MAX_TOKEN_BODY = 256 * 1024
# Pages of one referrers answer followed (each a bounded manifest-sized body).
MAX_REFERRER_PAGES = 20
# Every manifest type, named: registries (distribution among them) hide OCI and list types
# from a client that does not name them, and rewrite a list to one platform's manifest.
ACCEPT_ALL = {"Accept": ", ".join(MANIFEST_TYPES)}
ACCEPT_INDEX = {"Accept": OCI_INDEX}


class UpstreamDenied(NameUnknown):
    """Upstream refused us the repository: it does not exist or needs other credentials."""


class Health(Protocol):
    """Where the client reports how its upstream behaves (upstream/health.py)."""

    max_retry_after: float  # the longest a 429 stops calls (upstream.rate_limit_max_backoff)

    def open_state(self) -> tuple[dict, float] | None: ...
    def take_probe(self) -> bool: ...
    def probe_wait(self) -> float: ...
    def failed(self, reason: str) -> None: ...
    def rate_limited(self, retry_after: float | None) -> None: ...
    def succeeded(self) -> None: ...
    def record_rate_limit(self, fields: dict[str, str]) -> None: ...


class Tokens(Protocol):
    def get(self, key: tuple[str, ...]) -> str | None: ...
    def put(self, key: tuple[str, ...], token: str, expires_in: float) -> None: ...


class UpstreamConnection:
    def __init__(
        self,
        registry: RegistrySettings,
        session: requests.Session,
        *,
        connect_timeout: float,
        read_timeout: float,
        metadata_timeout: float | None = None,
        tokens: Tokens | None = None,
        health: Health | None = None,
        metrics: Metrics | None = None,
        max_manifest_size: int = UpstreamSettings.max_manifest_size,
    ) -> None:
        self.registry = registry
        self.session = session
        # Small answers (manifests, HEADs, tokens, tag lists) get the short metadata timeout;
        # blob bodies may pause for read_timeout.
        self.timeout = (connect_timeout, metadata_timeout or read_timeout)
        self.blob_timeout = (connect_timeout, read_timeout)
        self.tokens: Tokens = tokens or TokenCache()
        self.health = health
        self.metrics = metrics
        self.max_manifest_size = max_manifest_size

    @property
    def identity(self) -> str:
        """Who this client is upstream: the account name, empty when anonymous."""
        return self.registry.credentials.username if self.registry.credentials else ""

    # -- plumbing ------------------------------------------------------------------------------
    def _digest_header(self, response: requests.Response) -> Digest | None:
        """`Docker-Content-Digest`, parsed as a client's digest is; a failure if malformed."""
        value = response.headers.get("Docker-Content-Digest")
        if value is None:
            return None
        digest = parse_or_none(value.strip())
        if digest is None:
            raise self._failure("sent a Docker-Content-Digest that is not a valid digest")
        return digest

    def _url(self, repository: str, path: str) -> str:
        return f"{self.registry.url}/v2/{repository}/{path}"

    def _failure(self, what: str) -> UpstreamError:
        return UpstreamError(
            f"upstream {self.registry.name} ({self.registry.url}) {what}",
            reason=f"{self.registry.name} {what}, not cached",
        )

    def _send(
        self, method: str, url: str, *, blob: bool = False, **kwargs: Any
    ) -> requests.Response:
        self._check_breaker()
        started = time.monotonic()
        try:
            response = self.session.request(
                method,
                url,
                timeout=self.blob_timeout if blob else self.timeout,
                verify=self.registry.tls_verify,
                allow_redirects=False,
                **kwargs,
            )
        except requests.exceptions.ConnectTimeout:
            self._count(method, "error")
            reason = "did not accept a connection in time"
        except requests.exceptions.ReadTimeout:
            self._count(method, "error")
            reason = "did not answer in time"
        except requests.exceptions.SSLError:
            self._count(method, "error")
            reason = "failed the TLS handshake or certificate check"
        except requests.exceptions.ConnectionError as exc:
            self._count(method, "error")
            reason = connection_reason(exc)
        except requests.exceptions.RequestException as exc:
            self._count(method, "error")
            reason = f"request failed ({type(exc).__name__})"
        else:
            self._count(method, str(response.status_code))
            self._observe(response)
            # The path only: never a header, never the query (it may name an account).
            log.info(
                "upstream registry=%s method=%s path=%s status=%d ms=%.1f",
                self.registry.name,
                method,
                urlsplit(url).path,
                response.status_code,
                (time.monotonic() - started) * 1000,
            )
            return response
        host = urlsplit(url).netloc
        where = (
            self.registry.url if host == self.registry.host else f"{self.registry.url} via {host}"
        )
        later = ""
        headers = {}
        if self.health is not None:
            self.health.failed(reason)
            # From the first failure of an outage on, the client hears when a retry can
            # reach the upstream again (the breaker's next probe), as once it is open.
            wait = max(1, math.ceil(self.health.probe_wait()))
            later, headers = f"; retry in {wait} s", {"Retry-After": str(wait)}
        log.info(
            "upstream registry=%s method=%s path=%s status=error reason=%r ms=%.1f",
            self.registry.name,
            method,
            urlsplit(url).path,
            reason,
            (time.monotonic() - started) * 1000,
        )
        raise UpstreamUnavailable(
            f"upstream {self.registry.name} ({where}) {reason}{later}",
            headers=headers,
            reason=f"{self.registry.name} unreachable ({reason}), not cached{later}",
        )

    def _count(self, method: str, status: str) -> None:
        if self.metrics is not None:
            self.metrics.upstream_requests.labels(self.registry.name, method, status).inc()

    def _check_breaker(self) -> None:
        state = self.health.open_state() if self.health is not None else None
        if state is None:
            return
        what, remaining = state
        name = self.registry.name
        if what.get("status") == 429:
            wait = max(1, math.ceil(remaining))
            raise TooManyRequests(
                f"upstream {name} is rate-limiting this cache, and this is not cached; retry "
                f"in {wait} s",
                headers={"Retry-After": str(wait)},
                reason=f"{name} rate limit reached, not cached; retry in {wait} s",
                cause=f"upstream {name} is rate-limiting this cache; asking again in {wait} s",
            )
        assert self.health is not None  # the breaker's state came from it
        if self.health.take_probe():
            return  # this call is the probe: an answer closes the breaker for everyone
        wait = max(1, math.ceil(self.health.probe_wait()))
        cause = what.get("reason", "failing")
        raise UpstreamUnavailable(
            f"upstream {name} ({self.registry.url}) keeps failing ({cause}); the next "
            f"attempt to reach it is in {wait} s",
            headers={"Retry-After": str(wait)},
            reason=f"{name} unreachable ({cause}), not cached; retry in {wait} s",
        )

    def _observe(self, response: requests.Response) -> None:
        """Feed the breaker and the rate-limit record from an answer."""
        if self.health is None:
            return
        limits = rate_limit_fields(response.headers)
        if limits:
            self.health.record_rate_limit(limits)
        if response.status_code == 429:
            self.health.rate_limited(retry_after(response.headers.get("Retry-After")))
        elif response.status_code >= 500:
            self.health.failed(f"answered {response.status_code}")
        else:
            self.health.succeeded()

    def _request(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
        follow: bool = False,
        blob: bool = False,
    ) -> requests.Response:
        url = self._url(repository, path)
        scope = f"repository:{repository}:pull"
        headers = dict(headers or {})
        token = self.tokens.get(self._token_key(scope))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        response = self._send(method, url, headers=headers, params=params, stream=stream, blob=blob)
        if response.status_code == 401:
            challenge = parse_challenge(response.headers.get("WWW-Authenticate"))
            response.close()
            auth = self._authorize(challenge, scope)
            if auth is None:
                message = f"upstream {self.registry.name} requires credentials for {repository}"
                raise UpstreamDenied(message, reason=message)
            headers["Authorization"] = auth
            response = self._send(
                method, url, headers=headers, params=params, stream=stream, blob=blob
            )
        hops = 0
        while follow and response.status_code in (301, 302, 303, 307, 308) and hops < MAX_REDIRECTS:
            location = response.headers.get("Location")
            response.close()
            if not location:
                raise self._failure("sent a redirect without a Location")
            previous, url = url, urljoin(url, location)
            self._check_hop(url, previous, "redirected")
            # Never forward our upstream credentials to the redirect target (a CDN).
            headers.pop("Authorization", None)
            response = self._send(method, url, headers=headers, stream=stream, blob=blob)
            hops += 1
        return response

    def _check_hop(self, url: str, previous: str, what: str, *, any_port: bool = False) -> None:
        """Refuse to follow an upstream to where it should not lead us: anything but
        http(s), https down to http, or a host that resolves to a loopback, link-local or
        private address (the cloud's metadata service, Redis, an admin page), unless it is
        the upstream's own host and port (`any_port`: any port of its host, as a token
        service beside a registry often has) or listed in its redirect_allow (`host` for any
        port of it, `host:port` for one)."""
        parts, before = urlsplit(url), urlsplit(previous)
        try:
            host, port = (parts.hostname or "").lower(), port_of(parts)
        except ValueError:
            raise self._failure(f"{what} to a URL with an invalid port; not followed") from None
        if parts.scheme not in ("http", "https") or not host:
            raise self._failure(f"{what} to a URL that is not http(s); not followed")
        if before.scheme == "https" and parts.scheme == "http":
            raise self._failure(f"{what} from https to plain http ({host}); not followed")
        own = urlsplit(self.registry.url)
        if host == (own.hostname or "").lower() and (port == port_of(own) or any_port):
            return
        allowed = self.registry.redirect_allow
        if host in allowed or f"{host}:{port}" in allowed:
            return
        try:
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            raise self._failure(f"{what} to {host}, which does not resolve") from None
        for info in infos:
            if not_global(str(info[4][0])):
                raise self._failure(
                    f"{what} to {host}:{port} ({info[4][0]}), an address that is not "
                    "globally routable (loopback, private, link-local, CGNAT); not followed "
                    "(the registry's redirect_allow lists hosts that may be)"
                )

    def _token_key(self, scope: str) -> tuple[str, ...]:
        return (self.registry.url, scope, self.identity)

    def _authorize(self, challenge: Challenge | None, scope: str) -> str | None:
        creds = self.registry.credentials
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if creds is None:
                return None
            raw = f"{creds.username}:{creds.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return None
        realm = challenge.params["realm"]
        self._check_hop(realm, self.registry.url, "named a token service", any_port=True)
        where = urlsplit(realm)
        in_the_clear = where.scheme != "https" and where.hostname != self.registry.hostname
        if creds is not None and in_the_clear:
            # Our credentials go to the realm: in the clear only to the upstream itself.
            raise self._failure(
                f"named a token service at {where.netloc} over plain http; the credentials "
                "are not sent there"
            )
        params = {"scope": scope}
        if "service" in challenge.params:
            params["service"] = challenge.params["service"]
        auth = (creds.username, creds.password) if creds else None
        response = self._send("GET", realm, params=params, auth=auth, stream=True)
        with response:
            if response.status_code in (401, 403):
                message = f"token service of upstream {self.registry.name} refused the credentials"
                raise UpstreamDenied(message, reason=message)
            if response.status_code != 200:
                raise self._failure(f"token service answered {response.status_code}")
            body = self._read_bounded(response, "", "a token", MAX_TOKEN_BODY)
            try:
                data = json.loads(body)
                token = data.get("token") or data.get("access_token")
                expires_in = token_expiry(data.get("expires_in"))
            except (ValueError, AttributeError, TypeError):
                token = None
        if not token or not isinstance(token, str):
            raise self._failure("token service answered without a token")
        self.tokens.put(self._token_key(scope), token, expires_in)
        return f"Bearer {token}"

    def _raise_for_status(
        self,
        response: requests.Response,
        repository: str,
        not_found: type[RegistryError],
        what: str,
    ) -> None:
        """Raise the RegistryError of a failed answer about `what` ("tag x", "blob d"; empty
        for the repository itself)."""
        status = response.status_code
        if status < 300:
            return
        name = self.registry.name
        if status == 404:
            message = (
                f"upstream {name} has no {what} in {repository}"
                if what and "NAME_UNKNOWN" not in error_codes(response)
                else f"upstream {name} has no repository {repository}"
            )
            raise not_found(message, reason=message)
        if status in (401, 403):
            # Docker Hub answers so for a repository that does not exist, too.
            message = (
                f"upstream {name} denied access to {repository} (it does not exist there, "
                "or needs other credentials)"
            )
            raise UpstreamDenied(message, reason=message)
        if status == 429:
            headers = {}
            # Parsed, never relayed as text: what reaches our clients is a number we chose.
            seconds = retry_after(response.headers.get("Retry-After"))
            cap = self.health.max_retry_after if self.health is not None else None
            if seconds is not None and cap is not None:
                seconds = min(seconds, cap)  # our breaker asks again by then
            retry = str(math.ceil(seconds)) if seconds is not None else ""
            if retry:
                headers["Retry-After"] = retry
            later = f"; retry in {retry} s" if retry else ""
            raise TooManyRequests(
                f"upstream {name} is rate-limiting this cache, and this is not cached{later}",
                headers=headers,
                reason=f"{name} rate limit reached, not cached{later}",
                cause=f"upstream {name} is rate-limiting this cache (429)",
            )
        raise self._failure(f"answered {status}")

    def _read_bounded(
        self,
        response: requests.Response,
        repository: str,
        what: str = "a manifest",
        limit: int | None = None,
        *,
        over: str | None = None,
    ) -> bytes:
        """A small answer's body (a manifest, a tag list, a token), at most `limit` bytes
        (the manifest bound by default): past it, a failure, whatever Content-Length said."""
        limit = self.max_manifest_size if limit is None else limit
        chunks = []
        size = 0
        try:
            for chunk in response.raw.stream(CHUNK_SIZE, decode_content=False):
                size += len(chunk)
                if size > limit:
                    raise self._failure(over or f"sent {what} over {limit} bytes")
                chunks.append(chunk)
        except requests.exceptions.RequestException as exc:
            raise UpstreamUnavailable(
                f"upstream {self.registry.name} failed while sending {what} ({exc})",
                reason=f"{self.registry.name} failed while sending {what}, not cached",
            ) from None
        except Exception as exc:  # urllib3 protocol/timeout errors during the read
            if isinstance(exc, RegistryError):
                raise
            raise UpstreamUnavailable(
                f"upstream {self.registry.name} failed while sending {what} ({type(exc).__name__})",
                reason=f"{self.registry.name} failed while sending {what}, not cached",
            ) from None
        return b"".join(chunks)
