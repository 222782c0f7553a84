"""Who may pull (the `auth:` section), as a WSGI layer in front of the app: logins
(registry/logins.py) spoken as HTTP Basic and as the Docker token flow (a 401 names this
cache's `/auth/token` as the realm), client certificates (their verified name, set by
tls.identified), networks whose hosts pull without a login, per-user and per-group rules
over repository globs, and the web pages and /metrics behind the same logins or open.

A refusal is a 401 (who are you), 403 (not this repository) or 429 (too many failed logins)
whose status line says why: Docker, podman and containerd print that line. Failed logins are
counted per client address across every process and answered a second late; past
auth.max_failed_logins in 15 minutes the address is refused until the window ends. Passwords
and tokens are never logged."""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs

from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map

from registry import accesslog
from registry.clients import Clients, visit_of
from registry.config import AuthSettings, Gate, Settings
from registry.coordination.logins import FAILED_WINDOW, Logins
from registry.hostnames import OPEN_PATHS
from registry.logins import Tokens, Users
from registry.metrics import Metrics
from registry.names import resolve
from registry.tls import PEER_KEY

log = logging.getLogger("registry.auth")

StartResponse = Callable[..., Any]
TOKEN_PATH = "/auth/token"
SERVICE = "pullthrough"
# A failed login is answered this late (per request: other clients are not held up).
FAILED_DELAY = 1.0


class How(StrEnum):
    """How a request's client was recognised."""

    CERTIFICATE = "certificate"
    PASSWORD = "password"
    TOKEN = "token"
    NETWORK = "network"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Who:
    user: str | None  # None: not a user (a network, anyone, Prometheus's token)
    how: How


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str  # metrics label
    why: str  # the status line's text after the standard phrase


PHRASES = {401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests"}
CODES = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}


class Access:
    """The rules: with none, every user may pull everything."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.networks = [ipaddress.ip_network(n, strict=False) for n in settings.allow_networks]

    def from_allowed_network(self, address: str | None) -> bool:
        if not self.networks or not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def may_pull(self, user: str, names: Iterable[str]) -> bool:
        rules = self.settings.access
        if not rules:
            return True
        groups = self.settings.groups_of(user)
        names = list(names)
        for rule in rules:
            if user in rule.users or "*" in rule.users or set(groups) & set(rule.groups):
                for glob in rule.repositories:
                    if any(fnmatch.fnmatchcase(name, glob) for name in names):
                        return True
        return False


def _basic(header: str) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(header, validate=True).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


ADMIN_PREFIX = "/admin/"


def _area(path: str) -> str:
    if path == "/v2" or path.startswith("/v2/"):
        return "v2"
    if path.startswith(ADMIN_PREFIX):
        return "admin"  # never open, whatever auth.ui says
    return "metrics" if path == "/metrics" else "ui"


def _kind_of(path: str) -> tuple[str | None, str | None]:
    """A /v2/ path's kind (manifest | blob | None) and reference."""
    for marker, kind in (("/manifests/", "manifest"), ("/blobs/", "blob")):
        _, found, reference = path.rpartition(marker)
        if found:
            return kind, reference
    return None, None


class Guard:
    """The WSGI layer: answers /auth/token, refuses what `auth:` does not allow, and names
    the user in REMOTE_USER (the access log's `user`) for what it lets through."""

    def __init__(
        self,
        app: Callable[[dict, StartResponse], Iterable[bytes]],
        settings: Settings,
        logins: Logins,
        metrics: Metrics | None,
        clients: Clients | None = None,
        users: Users | None = None,
        url_map: Map | None = None,
    ) -> None:
        assert settings.auth is not None
        self.app = app
        self.settings = settings
        self.auth = settings.auth
        self.logins = logins
        self.metrics = metrics
        self.clients = clients
        # The app's own router: a repository is named here exactly as the route that
        # answers will name it (a name may contain `/manifests/` or `/blobs/`).
        self.router = url_map.bind("localhost") if url_map is not None else None
        self.users = users or Users(self.auth.htpasswd)
        self.tokens = Tokens(logins, self.auth.token_ttl)
        self.access = Access(self.auth)
        # An empty file is no token (an empty Bearer must not match it).
        self.metrics_token = (
            self.auth.metrics_token_file.read_text().strip()
            if self.auth.metrics_token_file
            else None
        ) or None

    # -- the layer ---------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        # Only this layer names the user (a front proxy's header would not be checked).
        environ.pop("REMOTE_USER", None)
        if environ.get(PEER_KEY):
            environ["REMOTE_USER"] = environ[PEER_KEY]
        path = environ.get("PATH_INFO", "")
        if path in OPEN_PATHS:
            return self.app(environ, start_response)
        if path == TOKEN_PATH:
            return self.token_endpoint(environ, start_response)
        area = _area(path)
        if (area == "ui" and self.auth.ui is Gate.OPEN) or (
            area == "metrics" and self.auth.metrics is Gate.OPEN
        ):
            return self.app(environ, start_response)
        who = self.identify(environ, area)
        if isinstance(who, Refusal):
            return self.refuse(environ, start_response, who, area)
        if area == "v2" and who.user is not None and self.auth.access:  # no rules: all
            name = self._repository_of(environ)
            if name is not None and not self.access.may_pull(who.user, self._names(name, environ)):
                refusal = Refusal(403, "access", f"user {who.user} may not pull {name[:200]}")
                environ["REMOTE_USER"] = who.user
                return self.refuse(environ, start_response, refusal, area)
        if area == "admin" and not self.auth.is_admin(who.user):
            refusal = Refusal(
                403, "access", f"user {who.user or '-'} is not an admin (auth.admins)"
            )
            return self.refuse(environ, start_response, refusal, area)
        if who.user:
            environ["REMOTE_USER"] = who.user
        return self.app(environ, start_response)

    def _repository_of(self, environ: dict) -> str | None:
        """The repository name the route answering this request reads from its path."""
        if self.router is None:
            return None
        try:
            _, args = self.router.match(
                environ.get("PATH_INFO", ""), method=environ.get("REQUEST_METHOD", "GET")
            )
        except HTTPException:  # no route, or not this method: the app answers it
            return None
        name = args.get("name")
        return name if isinstance(name, str) else None

    def _names(self, name: str, environ: dict) -> list[str]:
        """What access globs are matched against: the name as written, the repository, and
        `<registry>/<repository>`."""
        names = [name]
        query = environ.get("QUERY_STRING")
        ns = parse_qs(query).get("ns", [None])[0] if query else None
        try:
            target = resolve(self.settings, name, ns)
        except Exception:  # an invalid name: the app answers it with its own error
            return names
        return [*names, target.repository, f"{target.registry.name}/{target.repository}"]

    def identify(self, environ: dict, area: str) -> Who | Refusal:
        address = environ.get("REMOTE_ADDR")
        if environ.get(PEER_KEY):  # a verified client certificate (tls.identified)
            return Who(environ[PEER_KEY], How.CERTIFICATE)
        scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        if scheme == "bearer" and credentials:
            if (
                area == "metrics"
                and self.metrics_token is not None
                and hmac.compare_digest(credentials, self.metrics_token)
            ):
                return Who(None, How.TOKEN)
            user = self.tokens.user_of(credentials)
            if user is None:
                return Refusal(401, "token", "the token expired or is not this cache's: log in")
            if user:
                return Who(user, How.TOKEN)
            # An anonymous token: whatever lets this client pull without a login decides.
        elif scheme == "basic" and credentials:
            return self.password(address, credentials)
        if area == "v2":
            if self.auth.anonymous:
                return Who(None, How.ANONYMOUS)
            if self.access.from_allowed_network(address):
                return Who(None, How.NETWORK)
        return Refusal(
            401, "login", f"log in to {'pull from' if area == 'v2' else 'read'} this cache"
        )

    def password(self, address: str | None, credentials: str) -> Who | Refusal:
        given = _basic(credentials)
        address = address or "-"
        try:
            if self.logins.failures(address) >= self.auth.max_failed_logins:
                return Refusal(
                    429,
                    "locked",
                    f"too many failed logins from {address}: wait {FAILED_WINDOW // 60} minutes",
                )
        except RedisError:
            pass  # nothing to count with: the password check still stands
        if given is not None and self.users.check(*given):
            return Who(given[0], How.PASSWORD)
        user = given[0][:64] if given else "?"
        try:
            count = self.logins.failed(address)
        except RedisError:
            count = 0
        log.warning("failed login for user %r from %s (%d in %d min)", user, address, count,
                    FAILED_WINDOW // 60)  # fmt: skip
        time.sleep(FAILED_DELAY)  # a greenlet's sleep: this client waits, no one else
        return Refusal(401, "password", f"wrong user name or password for {user}")

    def refuse(
        self, environ: dict, start_response: StartResponse, refusal: Refusal, area: str
    ) -> Iterable[bytes]:
        if self.metrics is not None:
            self.metrics.refused.labels(refusal.reason).inc()
        body = json.dumps(
            {"errors": [{"code": CODES[refusal.status], "message": refusal.why}]}
        ).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Docker-Distribution-API-Version", "registry/2.0"),
        ]
        if refusal.status == 401:
            headers.append(("WWW-Authenticate", self.challenge(environ, area)))
        if refusal.status == 429:
            headers.append(("Retry-After", str(FAILED_WINDOW)))
        path = environ.get("PATH_INFO", "")
        if self.clients is not None and area == "v2":
            # The Hosts page's last error: a Docker host falls back to Docker Hub on a
            # mirror's 401 and prints only Docker Hub's answer.
            kind, reference = _kind_of(path)
            seen = visit_of(environ.get("REMOTE_ADDR"), environ.get("HTTP_USER_AGENT", ""),
                            None, kind, reference, environ.get("REMOTE_USER"))  # fmt: skip
            self.clients.done(seen, refusal.status, 0, None, refusal.why)
        accesslog.request(
            environ.get("REMOTE_ADDR"), environ.get("REQUEST_METHOD", "-"), None,
            self._repository_of(environ) if area == "v2" else None, None, None, None,
            refusal.status,
            0, 0.0, None, path, environ.get("REMOTE_USER"),
        )  # fmt: skip
        # The reason names what the client sent (a user, a repository): printable ASCII only,
        # so no line break of theirs reaches the status line.
        why = "".join(c if " " <= c <= "~" else "?" for c in refusal.why)
        start_response(f"{refusal.status} {PHRASES[refusal.status]}: {why}", headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def challenge(self, environ: dict, area: str) -> str:
        if area != "v2":
            return f'Basic realm="{SERVICE}"'
        host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "localhost")
        realm = f"{environ.get('wsgi.url_scheme', 'http')}://{host}{TOKEN_PATH}"
        out = f'Bearer realm="{realm}",service="{SERVICE}"'
        name = self._repository_of(environ)
        if name is not None:
            out += f',scope="repository:{name}:pull"'
        return out

    # -- /auth/token -------------------------------------------------------------------

    def token_endpoint(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        """Docker's token flow: GET with Basic credentials (or none, for a client that may
        pull without a login), or an OAuth2 password grant POSTed as a form (containerd)."""
        method = environ.get("REQUEST_METHOD")
        address = environ.get("REMOTE_ADDR")
        if method == "POST":
            form = parse_qs(self._body(environ).decode("utf-8", "replace"))
            if form.get("grant_type", [""])[0] != "password":
                return self._json(start_response, "400 Bad Request", {
                    "error": "unsupported_grant_type",
                    "error_description": "this cache grants tokens for a password only",
                })  # fmt: skip
            user, password = form.get("username", [""])[0], form.get("password", [""])[0]
            credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
            who: Who | Refusal = self.password(address, credentials)
        else:
            scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
            if scheme.lower() == "basic" and credentials:
                who = self.password(address, credentials.strip())
            elif environ.get(PEER_KEY):
                who = Who(environ[PEER_KEY], How.CERTIFICATE)
            elif self.auth.anonymous or self.access.from_allowed_network(address):
                who = Who(None, How.ANONYMOUS)
            else:
                who = Refusal(401, "login", "log in to pull from this cache")
        if isinstance(who, Refusal):
            return self.refuse(environ, start_response, who, "token")
        try:
            token = self.tokens.issue(who.user)
        except RedisError:
            status = "503 Service Unavailable: Redis is unreachable, no login tokens"
            return self._json(start_response, status, {"error": "redis_unavailable"})
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return self._json(start_response, "200 OK", {
            "token": token, "access_token": token, "expires_in": self.auth.token_ttl,
            "issued_at": issued,
        })  # fmt: skip

    @staticmethod
    def _body(environ: dict) -> bytes:
        try:
            length = min(int(environ.get("CONTENT_LENGTH") or 0), 64 << 10)
        except ValueError:
            length = 0
        return environ["wsgi.input"].read(length) if length > 0 else b""

    @staticmethod
    def _json(start_response: StartResponse, status: str, data: dict) -> Iterable[bytes]:
        body = json.dumps(data).encode()
        start_response(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body]
