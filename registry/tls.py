"""The cache's own TLS: the server context its workers answer handshakes with (reloaded
when the certificate files change), the name a client certificate gives its client, and
the private CA behind `python -m registry tls init` and `tls client`."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.config import TlsSettings
from registry.store.filesystem import file_version

log = logging.getLogger("registry.tls")

# How often the certificate files are looked at (one stat each) for a renewal.
CHECK_EVERY = 1.0


def _version(paths: Iterable[Path]) -> tuple:
    return tuple(file_version(path) for path in paths)


class ServerTls:
    """The SSL context for new connections. A renewed certificate (the files replaced or
    rewritten, as an ACME client or a private CA does) is used from the next handshake;
    connections already open keep theirs. A renewal that does not load (a key not matching
    its certificate, a file half-written) keeps the previous context and is logged."""

    def __init__(
        self,
        settings: TlsSettings,
        context_class: Callable[[int], ssl.SSLContext] = ssl.SSLContext,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._context_class = context_class
        self._clock = clock
        self._paths = [p for p in (settings.cert, settings.key, settings.client_ca) if p]
        self._lock = threading.Lock()
        self._version = _version(self._paths)
        self._context = self._load()  # the first load's error stops the worker: say it
        self._checked = clock()

    def _load(self) -> ssl.SSLContext:
        context = self._context_class(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.settings.cert, self.settings.key)
        if self.settings.client_ca is not None:
            context.load_verify_locations(cafile=str(self.settings.client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
        # HTTP/1.1 only: the workers speak nothing else.
        context.set_alpn_protocols(["http/1.1"])
        return context

    def context(self) -> ssl.SSLContext:
        now = self._clock()
        if now - self._checked < CHECK_EVERY:
            return self._context
        with self._lock:
            self._checked = now
            version = _version(self._paths)
            if version != self._version:
                try:
                    self._context = self._load()
                except (OSError, ssl.SSLError, ValueError) as exc:
                    log.error(
                        "server.tls: the changed certificate files do not load (%s); still "
                        "serving the previous certificate",
                        exc,
                    )
                else:
                    log.info("server.tls: certificate files changed; new connections get them")
                self._version = version
        return self._context


def peer_name(sock: Any) -> str | None:
    """The common name (else the first DNS name) of the client certificate `sock` was
    verified with, or None (no TLS, or no certificate asked for)."""
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        cert = getpeercert()
    except (ValueError, OSError):
        return None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)[:64]
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            return str(value)[:64]
    return None


# -- the private CA: `python -m registry tls init` and `tls client` ------------------------

CA_FILES = ("ca.crt", "ca.key")
SERVER_FILES = ("server.crt", "server.key")


@dataclass(frozen=True)
class Issued:
    certificate: Path
    key: Path


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pullthrough"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(directory: Path, days: int = 3650) -> Issued:
    """A private CA in `directory` (ca.crt, ca.key), kept when it is already there."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = (directory / name for name in CA_FILES)
    if cert_path.exists() and key_path.exists():
        return Issued(cert_path, key_path)
    key = _key()
    name = _name("pullthrough private CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return Issued(cert_path, key_path)


def issue(
    directory: Path,
    common_name: str,
    *,
    server: bool,
    hosts: Iterable[str] = (),
    ips: Iterable[str] = (),
    days: int = 825,
    not_before: datetime.datetime | None = None,
    out: Path | None = None,
) -> Issued:
    """A certificate signed by the CA in `directory`: for the server (its host names and
    addresses as subject alternative names) or for one client (named `common_name`).
    Written to `out` (default `directory`) as <stem>.crt and <stem>.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert = x509.load_pem_x509_certificate((directory / CA_FILES[0]).read_bytes())
    ca_key = serialization.load_pem_private_key((directory / CA_FILES[1]).read_bytes(), None)
    key = _key()
    start = not_before or (_now() - datetime.timedelta(minutes=5))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if server:
        names: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    where = out or directory
    where.mkdir(parents=True, exist_ok=True)
    stem = "server" if server else common_name
    issued = Issued(where / f"{stem}.crt", where / f"{stem}.key")
    # The key first: a certificate never waits on disk for a key that does not match it.
    _write_key(issued.key.with_suffix(".key.new"), key)
    _write_cert(issued.certificate.with_suffix(".crt.new"), cert)
    os.replace(issued.key.with_suffix(".key.new"), issued.key)
    os.replace(issued.certificate.with_suffix(".crt.new"), issued.certificate)
    return issued


def engine_placement(host_port: str, ca: Path, client: Issued | None) -> str:
    """Where each engine wants the CA (and a client certificate) to trust the cache at
    `host_port`, as commands an operator runs on each Docker, podman or containerd host."""
    lines = [
        f"Docker: /etc/docker/certs.d/{host_port}/ (no daemon restart needed)",
        f"  cp {ca} /etc/docker/certs.d/{host_port}/ca.crt",
    ]
    if client:
        lines += [
            f"  cp {client.certificate} /etc/docker/certs.d/{host_port}/client.cert",
            f"  cp {client.key} /etc/docker/certs.d/{host_port}/client.key",
        ]
    lines += [
        f'  daemon.json: "registry-mirrors": ["https://{host_port}"]',
        f"podman, skopeo, buildah, CRI-O: /etc/containers/certs.d/{host_port}/ (same names:"
        " ca.crt, client.cert, client.key), or --cert-dir DIR",
        f'containerd: /etc/containerd/certs.d/<registry>/hosts.toml, [host."https://{host_port}"]',
        f'  ca = "{ca}"',
    ]
    if client:
        lines.append(f'  client = [["{client.certificate}", "{client.key}"]]')
    return "\n".join(lines)


_UNKNOWN = object()
# The verified client certificate's name, where registry/auth.py reads it (REMOTE_USER is
# for the log; the Guard trusts only this key, which no request header can set).
PEER_KEY = "pullthrough.peer"


def identified(app: Any) -> Any:
    """A WSGI layer: a request on a TLS connection is `https`, and its verified client
    certificate's name is its REMOTE_USER (the access log's `user`, the Hosts page's name).
    The name is read once per connection."""

    def call(environ: dict, start_response: Any) -> Any:
        sock = environ.get("gunicorn.socket")
        if sock is not None and hasattr(sock, "getpeercert"):
            environ["wsgi.url_scheme"] = "https"
            name = getattr(sock, "pullthrough_peer", _UNKNOWN)
            if name is _UNKNOWN:
                name = peer_name(sock)
                # A socket class without a __dict__: read each time.
                with contextlib.suppress(AttributeError):
                    sock.pullthrough_peer = name
            if name:
                environ[PEER_KEY] = environ["REMOTE_USER"] = name
        return app(environ, start_response)

    return call
