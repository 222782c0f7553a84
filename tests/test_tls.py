"""TLS on the cache's own port: `python -m registry tls init` and `tls client` make a private
CA, the server's certificate and a client's; skopeo pulls through https with a client
certificate, byte-exact (a 48 MiB blob included: a TLS connection's bytes are encrypted in
the worker, never sendfile'd as they are), and so do podman (`--cert-dir`, through its
registries.conf mirror) and containerd (hosts.toml `ca` and `client`); a client without a
certificate, with one from another CA or with an expired one is refused with the reason in
each engine's own output; the certificate's name is the client's name in the access log and
on the Hosts page (read in Chromium); a renewed certificate is served to new connections
without a restart while open connections keep working; plain HTTP is served beside TLS on
the same port, or refused with 426 Upgrade Required, its status line saying to use https.
Docker is in tests/test_auth.py: it presents no client certificate to a mirror, and loads
none for a registry on a loopback address (which it always treats as insecure)."""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import requests

from registry import tls
from tests.support.clients import Podman, skopeo_copy, skopeo_policy
from tests.support.pki import client_files, make_pki
from tests.support.servers import ROOT, Containerd, Gunicorn, run_module


def wait_ready(url: str, **kwargs) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"{url}/healthz", timeout=5, **kwargs)
            return
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init, client = make_pki(directory)
    assert f"cert: {directory / 'server.crt'}" in init, init
    assert "/etc/docker/certs.d/localhost:5050/ca.crt" in init, init
    issued = directory / "clients"
    assert f"cp {issued / 'nuc.crt'} /etc/docker/certs.d/localhost:5050/client.cert" in client
    assert f'client = [["{issued / "nuc.crt"}", "{issued / "nuc.key"}"]]' in client, client
    return directory


def cert_dir(root: Path, name: str, pki: Path, client: tuple[Path, Path] | None) -> Path:
    """A certs.d-style directory as containers-image reads it: ca.crt, client.cert/.key."""
    directory = root / name
    directory.mkdir()
    shutil.copy(pki / "ca.crt", directory / "ca.crt")
    if client is not None:
        shutil.copy(client[0], directory / "client.cert")
        shutil.copy(client[1], directory / "client.key")
    return directory


@pytest.fixture(scope="module")
def mutual(tmp_path_factory, redis_server, upstream, pki):
    """Client certificates required: TLS only."""
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("tls-mutual"),
        redis_server.url,
        [{"name": "docker.io", "url": upstream.url}],
        workers=2,
        server={
            "tls": {
                "cert": str(pki / "server.crt"),
                "key": str(pki / "server.key"),
                "client_ca": str(pki / "ca.crt"),
            },
            "plain": False,
        },
    )
    server.https = server.url.replace("http://", "https://")
    wait_ready(
        server.https,
        verify=str(pki / "ca.crt"),
        cert=client_files(pki / "clients", "nuc"),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def both(tmp_path_factory, redis_server, upstream, pki):
    """A server certificate only: https and plain http on the same port."""
    work = tmp_path_factory.mktemp("tls-both")
    # Copies of the certificate files: the renewal test replaces them.
    shutil.copy(pki / "server.crt", work / "server.crt")
    shutil.copy(pki / "server.key", work / "server.key")
    server = Gunicorn.with_config(
        work,
        redis_server.url,
        [{"name": "docker.io", "url": upstream.url}],
        workers=1,
        server={"tls": {"cert": str(work / "server.crt"), "key": str(work / "server.key")}},
    )
    server.https = server.url.replace("http://", "https://")
    server.files = work
    wait_ready(server.url)
    yield server
    server.stop()


def skopeo_over_tls(work: Path, host: str, image, certs: Path, name: str):
    return skopeo_copy(
        skopeo_policy(work),
        f"{host}/docker.io/{image.repository}:{image.tag}",
        work / name,
        "--src-tls-verify=true",
        "--src-cert-dir",
        str(certs),
        check=False,
    )


def test_skopeo_pulls_through_tls_with_a_client_certificate_byte_exact(
    mutual, pki, images, tmp_path, browser
):
    host = mutual.url.removeprefix("http://")
    certs = cert_dir(tmp_path, "nuc", pki, client_files(pki / "clients", "nuc"))
    # big twice: streamed from its fill, then sent from the committed file.
    for n, key in enumerate(("busybox", "big", "big")):
        image = images[key]
        done = skopeo_over_tls(tmp_path, host, image, certs, f"{key}-{n}")
        assert done.returncode == 0, done.stderr
        for digest, blob in image.blobs.items():
            # skopeo checked each digest too; these are the upstream's own bytes.
            assert (tmp_path / f"{key}-{n}" / digest.split(":")[1]).read_bytes() == blob
    big = [
        line
        for line in mutual.log_path.read_text().splitlines()
        if "registry.access request" in line and "repository=library/big" in line
    ]
    blob = max(images["big"].blobs.values(), key=len)
    assert any("cache=hit" in line and f"bytes={len(blob)}" in line for line in big), big
    assert all(line.endswith(" user=nuc") for line in big), big
    # The Hosts page, read in Chromium presenting a client certificate of its own, names
    # skopeo's row by the certificate it pulled with.
    https = mutual.url.replace("http://", "https://")
    cert, key = client_files(pki / "clients", "nuc")
    context = browser.new_context(
        ignore_https_errors=True,
        client_certificates=[{"origin": https, "certPath": str(cert), "keyPath": str(key)}],
    )
    try:
        page = context.new_page()
        row = page.locator('tr[data-client="skopeo@127.0.0.1"] .user')
        for _ in range(20):  # each worker writes its Hosts counts once a second
            page.goto(f"{https}/ui/hosts")
            if row.count():
                break
            page.wait_for_timeout(250)
        assert row.inner_text() == "nuc"
    finally:
        context.close()


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("no certificate", "certificate required"),
        ("another CA's certificate", "unknown certificate authority"),
        ("an expired certificate", "expired certificate"),
    ],
)
def test_a_refused_client_certificate_reads_clearly_in_skopeo(
    mutual, pki, images, tmp_path, case, said
):
    client = {
        "no certificate": None,
        "another CA's certificate": client_files(pki / "other-ca", "stranger"),
        "an expired certificate": client_files(pki, "expired"),
    }[case]
    certs = cert_dir(tmp_path, "certs", pki, client)
    host = mutual.url.removeprefix("http://")
    done = skopeo_over_tls(tmp_path, host, images["busybox"], certs, "copy")
    assert done.returncode != 0
    assert said in done.stderr, done.stderr


def test_plain_http_is_refused_with_a_status_line_saying_to_use_https(mutual, images, tmp_path):
    response = requests.get(f"{mutual.url}/v2/", timeout=10)
    assert response.status_code == 426
    assert response.reason == "Upgrade Required: this cache speaks https only, use https://"
    assert response.json()["errors"][0]["code"] == "UNSUPPORTED"
    image = images["busybox"]
    done = skopeo_copy(
        skopeo_policy(tmp_path),
        f"{mutual.url.removeprefix('http://')}/docker.io/{image.repository}:{image.tag}",
        tmp_path / "copy",
        check=False,
    )
    assert done.returncode != 0
    assert "426 (Upgrade Required)" in done.stderr, done.stderr


def test_plain_http_and_https_are_served_on_the_same_port(both, pki, images):
    image = images["busybox"]
    path = f"/v2/{image.repository}/manifests/{image.tag}"
    accept = {"Accept": image.media_type}
    plain = requests.get(f"{both.url}{path}", headers=accept, timeout=30)
    secure = requests.get(
        f"{both.https}{path}", headers=accept, timeout=30, verify=str(pki / "ca.crt")
    )
    assert plain.status_code == secure.status_code == 200
    assert plain.content == secure.content == image.manifest


def served_serial(https_url: str, ca: Path) -> int:
    host, port = https_url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=str(ca))
    with context.wrap_socket(
        __import__("socket").create_connection((host, int(port)), timeout=10),
        server_hostname=host,
    ) as sock:
        der = sock.getpeercert(binary_form=True)
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def test_a_renewed_certificate_is_served_without_a_restart(both, pki):
    ca = pki / "ca.crt"
    workers = set(both.worker_pids())
    before = served_serial(both.https, ca)
    host, port = both.https.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=str(ca))
    open_connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    open_connection.request("GET", "/v2/")
    assert open_connection.getresponse().read() == b"{}"

    renewed = tls.issue(pki, "localhost", server=True, hosts=["localhost"], ips=["127.0.0.1"],
                        out=both.files / "renewed")  # fmt: skip
    # As an ACME client renews: the new files moved over the old ones.
    os.replace(renewed.key, both.files / "server.key")
    os.replace(renewed.certificate, both.files / "server.crt")
    deadline = time.monotonic() + 10
    while (after := served_serial(both.https, ca)) == before and time.monotonic() < deadline:
        time.sleep(0.3)
    assert after != before
    from cryptography import x509

    expected = x509.load_pem_x509_certificate((both.files / "server.crt").read_bytes())
    assert after == expected.serial_number
    # The connection opened before the renewal still serves, and nothing restarted.
    open_connection.request("GET", "/v2/")
    assert open_connection.getresponse().status == 200
    open_connection.close()
    assert set(both.worker_pids()) == workers
    assert "certificate files changed" in both.log_path.read_text()


def test_client_certificates_without_a_word_on_plain_http_is_a_config_error(tmp_path, pki):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"server:\n  tls:\n    cert: {pki / 'server.crt'}\n    key: {pki / 'server.key'}\n"
        f"    client_ca: {pki / 'ca.crt'}\n"
    )
    done = run_module("registry", config, "check-config", check=False)
    assert done.returncode == 2
    assert "set server.plain: false" in done.stdout + done.stderr


def test_tls_init_keeps_keys_private_and_chains_to_its_ca(pki):
    for key in (pki / "ca.key", pki / "server.key", pki / "clients" / "nuc.key"):
        assert oct(key.stat().st_mode & 0o777) == "0o600"
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pki / "ca.crt"), str(pki / "server.crt"),
         str(pki / "clients" / "nuc.crt")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


# -- podman and containerd with a client certificate -------------------------------------

CERT_CASES = {
    "no certificate": None,
    "another CA's certificate": ("other-ca", "stranger"),
    "an expired certificate": (".", "expired"),
}


def client_of(pki: Path, case: str | None) -> tuple[Path, Path] | None:
    if case is None:
        return client_files(pki / "clients", "nuc")
    where = CERT_CASES[case]
    return None if where is None else client_files(pki / where[0], where[1])


@pytest.mark.parametrize(
    ("case", "said"),
    [
        (None, None),
        ("no certificate", "certificate required"),
        ("another CA's certificate", "unknown certificate authority"),
        ("an expired certificate", "expired certificate"),
    ],
)
def test_podman_through_its_mirror_with_a_client_certificate(
    mutual, pki, images, tmp_path, case, said
):
    image = images["busybox"]
    podman = Podman(tmp_path / "podman")
    podman.conf.write_text(
        'unqualified-search-registries = ["docker.io"]\n\n[[registry]]\nprefix = "docker.io"\n'
        'location = "127.0.0.1:1/docker.io"\n[[registry.mirror]]\n'
        f'location = "{mutual.url.removeprefix("http://")}/docker.io"\n'
    )
    certs = cert_dir(tmp_path, "certs", pki, client_of(pki, case))
    try:
        done = podman.run(
            "pull", "--cert-dir", str(certs), f"docker.io/{image.repository}:{image.tag}"
        )
    finally:
        podman.close()
    if said is None:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode != 0
        assert said in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("case", "said"),
    [
        (None, None),
        ("no certificate", "certificate required"),
        ("another CA's certificate", "unknown certificate authority"),
        ("an expired certificate", "expired certificate"),
    ],
)
def test_containerd_with_a_client_certificate_in_hosts_toml(mutual, pki, images, short, case, said):
    image = images["busybox"]
    hosts = short / "certs.d" / "docker.io"
    hosts.mkdir(parents=True)
    https = mutual.url.replace("http://", "https://")
    text = f'[host."{https}"]\n  capabilities = ["pull", "resolve"]\n  ca = "{pki / "ca.crt"}"\n'
    client = client_of(pki, case)
    if client is not None:
        text += f'  client = [["{client[0]}", "{client[1]}"]]\n'
    (hosts / "hosts.toml").write_text(text)
    containerd = Containerd(short / "containerd").start()
    try:
        done = containerd.ctr(
            "images", "pull", "--snapshotter", "native", "--hosts-dir", str(short / "certs.d"),
            f"docker.io/{image.repository}:{image.tag}", check=False,
        )  # fmt: skip
    finally:
        containerd.stop()
    if said is None:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode != 0
        assert said in done.stderr, done.stderr
