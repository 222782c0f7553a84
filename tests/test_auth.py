"""Who may pull (`auth:`), with the real engines over TLS: skopeo (`--src-creds`), podman
(`podman login`, auth.json, a registries.conf mirror), containerd (`ctr --user`: the token
flow; a hosts.toml `header`: HTTP Basic) and the Docker daemon (the path form after `docker
login`; the registry-mirrors form, which presents the CLI's Docker Hub credentials to the
mirror's token realm and no client certificate) each pull byte-exact with a login and from
an allowed network, and each refused case (no login, a wrong password, a user without access
to the repository) reads clearly in the engine's own output (Docker's mirror form: on the
setup page, read in Chromium). Failed logins are counted per address and lock it out;
/metrics and the pages are behind the logins (or Prometheus's token file), /healthz is
open; `anonymous: true` pulls without one; admins refresh, pin, unpin and evict from the
repository page; no password or token is ever written to the log."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import requests

from tests.support.clients import Dockerd, Podman, skopeo_copy, skopeo_policy
from tests.support.pki import make_pki
from tests.support.servers import Containerd, Gunicorn, RedisServer, require

PASSWORDS = {"ci": "ci-secret-1", "bob": "bob-secret-2", "ops": "ops-secret-3"}
WRONG = "not-the-password-4"
METRICS_TOKEN = "prometheus-token-5"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("auth-pki")
    make_pki(directory)
    return directory


def htpasswd(path: Path) -> Path:
    lines = [
        subprocess.run(
            [require("htpasswd"), "-nbB", user, password],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        for user, password in PASSWORDS.items()
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def start(work: Path, redis_url: str, upstream, pki: Path, auth: dict) -> Gunicorn:
    server = Gunicorn.with_config(
        work,
        redis_url,
        [{"name": "docker.io", "url": upstream.url}],
        workers=2,
        server={"tls": {"cert": str(pki / "server.crt"), "key": str(pki / "server.key")}},
        auth=auth,
    )
    server.host = server.url.removeprefix("http://")
    server.https = f"https://{server.host}"
    return server


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    """This module's Redis: its Hosts table and failed logins are its clients' only."""
    server = RedisServer(tmp_path_factory.mktemp("auth-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, own_redis, upstream, pki):
    """Logins only: ci may pull library/*, ops (by its group) anything, bob nothing."""
    work = tmp_path_factory.mktemp("auth-guarded")
    (work / "metrics-token").write_text(METRICS_TOKEN + "\n")
    server = start(
        work,
        own_redis.url,
        upstream,
        pki,
        {
            "htpasswd": str(htpasswd(work / "htpasswd")),
            "groups": {"operators": ["ops"]},
            "access": [
                {"users": ["ci"], "repositories": ["library/*"]},
                {"groups": ["operators"], "repositories": ["*"]},
            ],
            "metrics_token_file": str(work / "metrics-token"),
            "max_failed_logins": 1000,
            "admins": ["operators"],
        },
    )
    wait_ready(server, pki)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lan(tmp_path_factory, own_redis, upstream, pki):
    """Loopback is the LAN: its hosts pull without a login."""
    work = tmp_path_factory.mktemp("auth-lan")
    server = start(
        work,
        own_redis.url,
        upstream,
        pki,
        {"htpasswd": str(htpasswd(work / "htpasswd")), "allow_networks": ["127.0.0.0/8"]},
    )
    wait_ready(server, pki)
    yield server
    server.stop()


def wait_ready(server: Gunicorn, pki: Path) -> None:
    import time

    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"{server.https}/healthz", verify=str(pki / "ca.crt"), timeout=5)
            return
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def certs(directory: Path, pki: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki / "ca.crt", directory / "ca.crt")
    return directory


def blobs_equal(directory: Path, image) -> None:
    for digest, blob in image.blobs.items():
        assert (directory / digest.split(":")[1]).read_bytes() == blob


# -- skopeo ----------------------------------------------------------------------------


def skopeo(server, pki, image, work: Path, *creds: str):
    return skopeo_copy(
        skopeo_policy(work),
        f"{server.host}/docker.io/{image.repository}:{image.tag}",
        work / "copy",
        "--src-tls-verify=true",
        "--src-cert-dir",
        str(certs(work / "certs", pki)),
        *creds,
        check=False,
    )


def test_skopeo_pulls_with_a_login_through_the_token_flow(guarded, pki, images, tmp_path):
    image = images["busybox"]
    done = skopeo(guarded, pki, image, tmp_path, "--src-creds", f"ci:{PASSWORDS['ci']}")
    assert done.returncode == 0, done.stderr
    blobs_equal(tmp_path / "copy", image)
    log = guarded.log_path.read_text()
    lines = [line for line in log.splitlines() if "repository=library/busybox" in line]
    assert any("status=200" in line and line.endswith(" user=ci") for line in lines), lines


@pytest.mark.parametrize(
    ("who", "repository", "said"),
    [
        (None, "busybox", "log in to pull from this cache"),
        (f"ci:{WRONG}", "busybox", "wrong user name or password for ci"),
        (f"bob:{PASSWORDS['bob']}", "busybox", "user bob may not pull"),
        (f"ci:{PASSWORDS['ci']}", "ocisingle", "user ci may not pull"),
    ],
)
def test_a_refused_pull_reads_clearly_in_skopeo(
    guarded, pki, images, tmp_path, who, repository, said
):
    creds = ("--src-creds", who) if who else ()
    done = skopeo(guarded, pki, images[repository], tmp_path, *creds)
    assert done.returncode != 0
    assert said in done.stderr, done.stderr


def test_a_group_rule_grants_any_repository(guarded, pki, images, tmp_path):
    image = images["ocisingle"]  # team/app: not library/*
    done = skopeo(guarded, pki, image, tmp_path, "--src-creds", f"ops:{PASSWORDS['ops']}")
    assert done.returncode == 0, done.stderr
    blobs_equal(tmp_path / "copy", image)


def test_an_allowed_network_pulls_without_a_login(lan, pki, images, tmp_path):
    image = images["busybox"]
    done = skopeo(lan, pki, image, tmp_path)
    assert done.returncode == 0, done.stderr
    blobs_equal(tmp_path / "copy", image)


# -- podman ----------------------------------------------------------------------------


def podman_mirror(podman: Podman, cache: str) -> None:
    """registries.conf: docker.io's mirror is the cache over verified TLS."""
    podman.conf.write_text(
        'unqualified-search-registries = ["docker.io"]\n\n[[registry]]\nprefix = "docker.io"\n'
        'location = "127.0.0.1:1/docker.io"\n[[registry.mirror]]\n'
        f'location = "{cache}/docker.io"\n'
    )


def test_podman_logs_in_and_pulls_through_its_mirror(guarded, pki, images, tmp_path):
    image = images["busybox"]
    podman = Podman(tmp_path / "podman")
    podman_mirror(podman, guarded.host)
    cert_dir = str(certs(tmp_path / "certs", pki))
    authfile = str(tmp_path / "auth.json")
    try:
        login = ("login", "--authfile", authfile, "--cert-dir", cert_dir, "-u", "ci")
        wrong = podman.run(*login, "-p", WRONG, guarded.host)
        assert wrong.returncode != 0
        # podman says it in its own words for a login's 401.
        assert "invalid username/password" in wrong.stderr, wrong.stderr
        done = podman.run(*login, "-p", PASSWORDS["ci"], guarded.host)
        assert done.returncode == 0, done.stderr
        pull = ("pull", "--authfile", authfile, "--cert-dir", cert_dir)
        done = podman.run(*pull, f"docker.io/{image.repository}:{image.tag}")
        assert done.returncode == 0, done.stderr
        inspect = podman.run("image", "inspect", f"docker.io/{image.repository}:{image.tag}")
        layers = json.loads(inspect.stdout)[0]["RootFS"]["Layers"]
        assert len(layers) == len(image.blobs) - 1  # all but the config
        refused = podman.run(*pull, f"docker.io/{images['ocisingle'].repository}:v1")
        assert refused.returncode != 0
        assert "user ci may not pull" in refused.stderr, refused.stderr
    finally:
        podman.close()
    assert "user=ci" in guarded.log_path.read_text()


# -- containerd ------------------------------------------------------------------------


def hosts_dir(root: Path, cache: str, pki: Path, header: str | None = None) -> Path:
    directory = root / "certs.d" / "docker.io"
    directory.mkdir(parents=True)
    text = f'[host."{cache}"]\n  capabilities = ["pull", "resolve"]\n  ca = "{pki / "ca.crt"}"\n'
    if header:
        text += f'  [host."{cache}".header]\n    Authorization = "{header}"\n'
    (directory / "hosts.toml").write_text(text)
    return root / "certs.d"


@pytest.fixture
def containerd(short):
    server = Containerd(short / "containerd").start()
    yield server
    server.stop()


def test_containerd_pulls_with_a_login_and_with_a_basic_header(
    guarded, pki, images, tmp_path, containerd
):
    image = images["busybox"]
    ref = f"docker.io/{image.repository}:{image.tag}"
    pull = ("images", "pull", "--snapshotter", "native")
    # ctr's --user: the token flow (a 401 names the realm; the password grant is POSTed).
    plain_dir = hosts_dir(tmp_path / "token", guarded.https, pki)
    wrong = containerd.ctr(*pull, "--hosts-dir", str(plain_dir), "--user", f"ci:{WRONG}", ref,
                           check=False)  # fmt: skip
    assert wrong.returncode != 0
    assert "wrong user name or password for ci" in wrong.stderr, wrong.stderr
    done = containerd.ctr(*pull, "--hosts-dir", str(plain_dir), "--user",
                          f"ci:{PASSWORDS['ci']}", ref, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    containerd.ctr("images", "rm", ref)
    # A hosts.toml header: HTTP Basic on every request, no token.
    basic = base64.b64encode(f"ci:{PASSWORDS['ci']}".encode()).decode()
    header_dir = hosts_dir(tmp_path / "header", guarded.https, pki, f"Basic {basic}")
    done = containerd.ctr(*pull, "--hosts-dir", str(header_dir), ref, check=False)
    assert done.returncode == 0, done.stderr
    other = f"docker.io/{images['ocisingle'].repository}:v1"
    refused = containerd.ctr(*pull, "--hosts-dir", str(header_dir), other, check=False)
    assert refused.returncode != 0
    assert "user ci may not pull" in refused.stderr, refused.stderr
    nobody = containerd.ctr(*pull, "--hosts-dir", str(plain_dir), ref, check=False)
    assert nobody.returncode != 0
    assert "log in to pull from this cache" in nobody.stderr, nobody.stderr


# -- Docker ----------------------------------------------------------------------------


@pytest.fixture
def docker_certs(guarded, lan, pki):
    """The CA where dockerd looks for each cache's host:port (removed afterwards)."""
    made = []
    for server in (guarded, lan):
        directory = Path("/etc/docker/certs.d") / server.host
        certs(directory, pki)
        made.append(directory)
    yield
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


def docker_config(directory: Path, auths: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    entries = {
        key: {"auth": base64.b64encode(value.encode()).decode()} for key, value in auths.items()
    }
    (directory / "config.json").write_text(json.dumps({"auths": entries}))
    return directory


def test_docker_pulls_by_path_after_docker_login(guarded, images, tmp_path, short, docker_certs):
    image = images["busybox"]
    config = str(docker_config(tmp_path / "cli", {}))
    docker = Dockerd(short / "d", guarded.https).start()
    try:
        nobody = docker.docker(
            "--config",
            config,
            "pull",
            f"{guarded.host}/{image.repository}:{image.tag}",
            check=False,
        )
        assert nobody.returncode != 0
        assert "log in to pull from this cache" in nobody.stderr, nobody.stderr
        login = ("--config", config, "login", guarded.host, "-u")
        done = subprocess.run(
            ["/usr/bin/docker", "-H", f"unix://{docker.socket}", *login, "ci", "--password-stdin"],
            input=WRONG, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode != 0
        assert "wrong user name or password for ci" in done.stderr, done.stderr
        done = subprocess.run(
            ["/usr/bin/docker", "-H", f"unix://{docker.socket}", *login, "ci", "--password-stdin"],
            input=PASSWORDS["ci"], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        pulled = docker.docker(
            "--config", config, "pull", f"{guarded.host}/{image.repository}:{image.tag}"
        )
        assert pulled.returncode == 0
        refused = docker.docker(
            "--config", config, "pull", f"{guarded.host}/{images['ocisingle'].repository}:v1",
            check=False,
        )  # fmt: skip
        assert refused.returncode != 0
        assert "user ci may not pull" in refused.stderr, refused.stderr
    finally:
        docker.stop()


def test_docker_through_its_mirror_setting_with_a_login_and_from_an_allowed_network(
    guarded, lan, pki, images, tmp_path, short, docker_certs, browser
):
    """Docker 20.10 presents the pulling CLI's Docker Hub credentials (config.json's
    https://index.docker.io/v1/ entry) to a mirror's token realm: a cache user's there pull
    through the mirror. Without them the mirror answers 401 and Docker falls back to Docker
    Hub (here a dead proxy); the refusal is then on the cache's setup page, read in
    Chromium, with what to change, and in its log."""
    image = images["busybox"]
    ref = f"{image.repository}:{image.tag}"
    hub = "https://index.docker.io/v1/"
    docker = Dockerd(short / "d", guarded.https).start()
    try:
        anonymous = docker.docker("pull", ref, check=False)
        assert anonymous.returncode != 0  # fell back to Docker Hub, which is not there
        assert "registry-1.docker.io" in anonymous.stderr  # all Docker says
        context = browser.new_context(
            ignore_https_errors=True,
            http_credentials={"username": "bob", "password": PASSWORDS["bob"]},
        )
        try:
            page = context.new_page()
            row = page.locator('#failing tr[data-client="docker@127.0.0.1"]')
            for _ in range(20):  # each worker writes its Hosts counts once a second
                page.goto(f"{guarded.https}/ui/setup")
                if row.count() and "401" in row.inner_text():
                    break
                page.wait_for_timeout(250)
            assert "401 log in to pull from this cache" in row.inner_text()
            assert "log it in" in row.locator(".advice").inner_text()
            forms = page.inner_text("#who")
            assert "Docker presents none to a mirror" in forms
            assert f'"registry-mirrors": ["{guarded.https}"]' in page.inner_text("#daemon-json")
            assert f"/etc/docker/certs.d/{guarded.host}/ca.crt" in page.inner_text("#tls")
        finally:
            context.close()
        with_login = str(docker_config(tmp_path / "cli", {hub: f"ci:{PASSWORDS['ci']}"}))
        done = docker.docker("--config", with_login, "pull", ref, check=False)
        assert done.returncode == 0, done.stderr
    finally:
        docker.stop()
    lines = guarded.log_path.read_text().splitlines()
    assert any("path=/v2/ user=-" in line and "status=401" in line for line in lines)
    docker = Dockerd(short / "lan", lan.https).start()
    try:
        done = docker.docker("pull", ref, check=False)
        assert done.returncode == 0, done.stderr
    finally:
        docker.stop()


# -- the rest --------------------------------------------------------------------------


def test_failed_logins_lock_an_address_out_and_slow_each_guess(tmp_path, upstream, pki):
    # A Redis of its own: the other tests' wrong passwords from 127.0.0.1 count elsewhere.
    redis = RedisServer(tmp_path / "redis").start()
    server = start(
        tmp_path / "strict",
        redis.url,
        upstream,
        pki,
        {"htpasswd": str(htpasswd(tmp_path / "htpasswd")), "max_failed_logins": 2},
    )
    try:
        wait_ready(server, pki)
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        port = int(server.host.split(":")[1])

        def login(source: str, password: str) -> tuple[int, str, float]:
            import time

            connection = http.client.HTTPSConnection(
                "127.0.0.1", port, context=context, timeout=30, source_address=(source, 0)
            )
            basic = base64.b64encode(f"ci:{password}".encode()).decode()
            started = time.monotonic()
            connection.request("GET", "/auth/token", headers={"Authorization": f"Basic {basic}"})
            response = connection.getresponse()
            response.read()
            connection.close()
            return response.status, response.reason, time.monotonic() - started

        for _ in range(2):
            status, _, seconds = login("127.0.0.2", WRONG)
            assert status == 401 and seconds >= 1.0
        status, reason, _ = login("127.0.0.2", PASSWORDS["ci"])
        assert status == 429
        assert reason == "Too Many Requests: too many failed logins from 127.0.0.2: wait 15 minutes"
        # Another address is not locked out.
        assert login("127.0.0.3", PASSWORDS["ci"])[0] == 200
        assert (
            "failed login for user 'ci' from 127.0.0.2 (2 in 15 min)" in server.log_path.read_text()
        )
        metrics = requests.get(
            f"{server.https}/metrics",
            auth=("ci", PASSWORDS["ci"]),
            verify=str(pki / "ca.crt"),
            timeout=10,
        ).text
        assert 'pullthrough_refused_requests_total{reason="password"} 2.0' in metrics
        assert 'pullthrough_refused_requests_total{reason="locked"} 1.0' in metrics
    finally:
        server.stop()
        redis.stop()


def test_metrics_and_pages_are_behind_the_logins_and_health_is_open(guarded, pki):
    ca = str(pki / "ca.crt")
    get = lambda path, **kw: requests.get(f"{guarded.https}{path}", verify=ca, timeout=10, **kw)  # noqa: E731
    assert get("/healthz").status_code == 200
    assert get("/readyz").status_code in (200, 503)
    for path in ("/metrics", "/ui/", "/"):
        refused = get(path)
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"] == 'Basic realm="pullthrough"'
        assert refused.reason == "Unauthorized: log in to read this cache"
    assert get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 200
    assert get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert get("/metrics", auth=("bob", PASSWORDS["bob"])).status_code == 200
    assert get("/ui/hosts", auth=("bob", PASSWORDS["bob"])).status_code == 200


def test_no_password_or_token_is_written_to_the_log(guarded, pki, images, tmp_path):
    image = images["busybox"]
    done = skopeo(guarded, pki, image, tmp_path, "--src-creds", f"ci:{PASSWORDS['ci']}")
    assert done.returncode == 0, done.stderr
    token = requests.get(
        f"{guarded.https}/auth/token",
        auth=("ci", PASSWORDS["ci"]),
        verify=str(pki / "ca.crt"),
        timeout=10,
    ).json()["token"]
    log = guarded.log_path.read_text()
    for secret in (*PASSWORDS.values(), WRONG, METRICS_TOKEN, token, token.split(".")[1]):
        assert secret not in log


# -- admin actions ---------------------------------------------------------------------


def tag_record(server, repository: str, tag: str) -> dict | None:
    path = server.data / "repositories" / "docker.io" / repository / "_manifests" / "tags" / tag
    return json.loads(path.read_text()) if path.exists() else None


def test_an_admin_refreshes_pins_and_evicts_a_tag_from_the_repository_page(
    guarded, pki, images, tmp_path, browser
):
    """ops (in the operators group, auth.admins) clicks each button on the repository page
    in Chromium; what it did is on disk and in the log with who did it."""
    image = images["busybox"]
    done = skopeo(guarded, pki, image, tmp_path, "--src-creds", f"ci:{PASSWORDS['ci']}")
    assert done.returncode == 0, done.stderr
    before = tag_record(guarded, image.repository, image.tag)
    assert before is not None
    context = browser.new_context(
        ignore_https_errors=True,
        http_credentials={"username": "ops", "password": PASSWORDS["ops"]},
    )
    try:
        page = context.new_page()
        page.goto(f"{guarded.https}/ui/repositories/{image.repository}")
        row = page.locator(f'td.actions[data-tag="{image.tag}"]')
        with page.expect_navigation():
            row.locator("button", has_text="refresh").click()
        after = tag_record(guarded, image.repository, image.tag)
        assert after is not None and after["validated"] > before["validated"]

        with page.expect_navigation():
            row.locator("button", has_text="pin").click()
        pin = guarded.data / "repositories" / "docker.io" / image.repository / "_pins" / image.tag
        assert pin.exists()
        pinned = page.locator("tr", has=page.locator(f'td.actions[data-tag="{image.tag}"]'))
        assert pinned.locator("td.pinned").inner_text() == "by an admin"
        with page.expect_navigation():
            row.locator("button", has_text="unpin").click()
        assert not pin.exists()

        with page.expect_navigation():
            row.locator("button", has_text="evict").click()
        assert tag_record(guarded, image.repository, image.tag) is None
    finally:
        context.close()
    log = guarded.log_path.read_text()
    for action in ("refresh", "pin", "unpin", "evict"):
        assert f"admin {action} {image.repository}:{image.tag} by ops from 127.0.0.1" in log


def test_admin_actions_are_refused_to_others_and_to_other_sites(guarded, pki, images, tmp_path):
    ca = str(pki / "ca.crt")
    image = images["busybox"]
    done = skopeo(guarded, pki, image, tmp_path, "--src-creds", f"ci:{PASSWORDS['ci']}")
    assert done.returncode == 0, done.stderr
    url = f"{guarded.https}/admin/pin"
    data = {"image": f"{image.repository}:{image.tag}"}
    bob = requests.post(url, data=data, auth=("bob", PASSWORDS["bob"]), verify=ca, timeout=10)
    assert bob.status_code == 403
    assert bob.reason == "Forbidden: user bob is not an admin (auth.admins)"
    page = requests.get(f"{guarded.https}/ui/repositories/{image.repository}",
                        auth=("bob", PASSWORDS["bob"]), verify=ca, timeout=10)  # fmt: skip
    assert page.status_code == 200 and 'td class="actions"' not in page.text
    nobody = requests.post(url, data=data, verify=ca, timeout=10)
    assert nobody.status_code == 401
    forged = requests.post(
        url, data=data, auth=("ops", PASSWORDS["ops"]), verify=ca, timeout=10,
        headers={"Origin": "https://elsewhere.example", "Sec-Fetch-Site": "cross-site"},
    )  # fmt: skip
    assert forged.status_code == 403
    assert forged.text == "refused: not from the cache's own pages\n"
    older = requests.post(
        url, data=data, auth=("ops", PASSWORDS["ops"]), verify=ca, timeout=10,
        headers={"Origin": "https://elsewhere.example"},
    )  # fmt: skip
    assert older.status_code == 403
    pin = guarded.data / "repositories" / "docker.io" / image.repository / "_pins" / image.tag
    assert not pin.exists()
    # The same from a shell: curl -u ops -X POST .../admin/pin?image=...
    done = requests.post(url, params=data, auth=("ops", PASSWORDS["ops"]), verify=ca, timeout=10)
    assert done.status_code == 200 and pin.exists()
    requests.post(f"{guarded.https}/admin/unpin", params=data, auth=("ops", PASSWORDS["ops"]),
                  verify=ca, timeout=10).raise_for_status()  # fmt: skip
    # A whole repository.
    app = images["ocisingle"]
    (tmp_path / "app").mkdir()
    done = skopeo(guarded, pki, app, tmp_path / "app", "--src-creds", f"ops:{PASSWORDS['ops']}")
    assert done.returncode == 0, done.stderr
    evicted = requests.post(f"{guarded.https}/admin/evict", params={"repository": app.repository},
                            auth=("ops", PASSWORDS["ops"]), verify=ca, timeout=10)  # fmt: skip
    assert evicted.status_code == 200, evicted.text
    assert evicted.text == f"evicted 1 tags of {app.repository}\n"
    assert tag_record(guarded, app.repository, app.tag) is None


def test_podman_containerd_and_docker_by_path_pull_from_an_allowed_network(
    lan, pki, images, tmp_path, short, docker_certs
):
    image = images["busybox"]
    ref = f"docker.io/{image.repository}:{image.tag}"
    podman = Podman(tmp_path / "podman")
    podman_mirror(podman, lan.host)
    try:
        done = podman.run("pull", "--cert-dir", str(certs(tmp_path / "certs", pki)), ref)
        assert done.returncode == 0, done.stderr
    finally:
        podman.close()
    containerd = Containerd(short / "containerd").start()
    try:
        directory = hosts_dir(short / "hosts", lan.https, pki)
        containerd.ctr("images", "pull", "--snapshotter", "native", "--hosts-dir",
                       str(directory), ref)  # fmt: skip
    finally:
        containerd.stop()
    docker = Dockerd(short / "d", lan.https).start()
    try:
        done = docker.docker("pull", f"{lan.host}/{image.repository}:{image.tag}", check=False)
        assert done.returncode == 0, done.stderr
    finally:
        docker.stop()
    served = [
        line
        for line in lan.log_path.read_text().splitlines()
        if "registry.access request" in line and "status=200" in line and "library/busybox" in line
    ]
    # Served to no user: the network let them in.
    assert served and all(line.endswith(" user=-") for line in served)


def test_anonymous_pulls_need_no_login_but_the_pages_still_do(
    tmp_path, own_redis, upstream, pki, images
):
    server = start(
        tmp_path / "anonymous",
        own_redis.url,
        upstream,
        pki,
        {"htpasswd": str(htpasswd(tmp_path / "htpasswd")), "anonymous": True, "metrics": "open"},
    )
    try:
        wait_ready(server, pki)
        image = images["busybox"]
        done = skopeo(server, pki, image, tmp_path)
        assert done.returncode == 0, done.stderr
        blobs_equal(tmp_path / "copy", image)
        ca = str(pki / "ca.crt")
        assert requests.get(f"{server.https}/metrics", verify=ca, timeout=10).status_code == 200
        assert requests.get(f"{server.https}/ui/", verify=ca, timeout=10).status_code == 401
    finally:
        server.stop()


# -- the layer itself, in process --------------------------------------------------------


@pytest.fixture
def layer_app(tmp_path, redis_server, redis_client, upstream):
    from registry import create_app
    from registry.config import settings_from_mapping

    settings = settings_from_mapping(
        {
            "storage": {"root": str(tmp_path / "data")},
            "redis": {"url": redis_server.url},
            "registries": [{"name": "docker.io", "url": upstream.url}],
            "auth": {
                "htpasswd": str(htpasswd(tmp_path / "htpasswd")),
                "admins": ["ops"],
                "access": [{"users": ["ci"], "repositories": ["library/busybox"]}],
            },
        },
        env={},
    )
    return create_app(settings).test_client()


def test_a_user_name_set_before_the_layer_is_not_believed(layer_app):
    """A front proxy's REMOTE_USER (gunicorn's forwarder_headers) is no login."""
    refused = layer_app.post(
        "/admin/pin?image=library/busybox:1.36", environ_overrides={"REMOTE_USER": "ops"}
    )
    assert refused.status_code == 401
    assert layer_app.get("/v2/", environ_overrides={"REMOTE_USER": "ci"}).status_code == 401


def test_tokens_need_the_shared_key_and_redis_for_a_new_one(layer_app, monkeypatch):
    from redis.exceptions import ConnectionError as RedisConnectionError

    from registry.coordination.logins import Logins

    def down(*_args, **_kwargs):
        raise RedisConnectionError("down")

    basic = {
        "Authorization": "Basic " + base64.b64encode(f"ci:{PASSWORDS['ci']}".encode()).decode()
    }
    # A process that has not read the shared key yet cannot sign with it.
    monkeypatch.setattr(Logins, "signing_key", down)
    answered = layer_app.get("/auth/token", headers=basic)
    assert answered.status_code == 503
    assert answered.status == "503 Service Unavailable: Redis is unreachable, no login tokens"
    monkeypatch.undo()
    token = layer_app.get("/auth/token", headers=basic).json["token"]
    assert layer_app.get("/v2/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    payload, _, signature = token.partition(".")
    other = ("A" if signature[0] != "A" else "B") + signature[1:]
    forged = {"Authorization": f"Bearer {payload}.{other}"}
    refused = layer_app.get("/v2/", headers=forged)
    assert refused.status_code == 401
    assert refused.status == "401 Unauthorized: the token expired or is not this cache's: log in"


def test_a_rule_sees_the_repository_the_route_will_serve(layer_app):
    """A repository name may itself contain `/manifests/`: the rule is checked against the
    name the blob route reads, not the first name-looking part of the path."""
    ci = {"Authorization": "Basic " + base64.b64encode(f"ci:{PASSWORDS['ci']}".encode()).decode()}
    digest = "sha256:" + "0" * 64
    refused = layer_app.get(f"/v2/library/busybox/manifests/x/blobs/{digest}", headers=ci)
    assert refused.status_code == 403
    assert refused.status == "403 Forbidden: user ci may not pull library/busybox/manifests/x"
    allowed = layer_app.get(f"/v2/library/busybox/blobs/{digest}", headers=ci)
    assert allowed.status_code == 404  # past the layer: the cache has no such blob


def test_what_a_client_sent_cannot_break_the_status_line(layer_app):
    ci = {"Authorization": "Basic " + base64.b64encode(f"ci:{PASSWORDS['ci']}".encode()).decode()}
    refused = layer_app.get("/v2/a%09%7fb/manifests/x", headers=ci)
    assert refused.status == "403 Forbidden: user ci may not pull a??b"
    user = base64.b64encode(b"ci\r\nX-Evil: 1:wrong").decode()
    refused = layer_app.get("/v2/", headers={"Authorization": f"Basic {user}"})
    assert refused.status == "401 Unauthorized: wrong user name or password for ci??X-Evil"


def test_an_empty_metrics_token_file_admits_no_empty_bearer(
    tmp_path, redis_server, redis_client, upstream
):
    from registry import create_app
    from registry.config import settings_from_mapping

    (tmp_path / "token").write_text("\n")
    settings = settings_from_mapping(
        {
            "storage": {"root": str(tmp_path / "data")},
            "redis": {"url": redis_server.url},
            "registries": [{"name": "docker.io", "url": upstream.url}],
            "auth": {"anonymous": True, "metrics_token_file": str(tmp_path / "token")},
        },
        env={},
    )
    client = create_app(settings).test_client()
    for header in ("Bearer ", "Bearer  ", "Bearer \t"):
        # In the environ as a server hands it over (the test client's headers are trimmed).
        answer = client.get("/metrics", environ_overrides={"HTTP_AUTHORIZATION": header})
        assert answer.status_code == 401, header


def test_a_password_longer_than_bcrypt_reads_is_refused_not_a_500(layer_app):
    long = base64.b64encode(b"ci:" + b"x" * 200).decode()
    refused = layer_app.get("/v2/", headers={"Authorization": f"Basic {long}"})
    assert refused.status == "401 Unauthorized: wrong user name or password for ci"
    unknown = base64.b64encode(b"nobody:" + b"x" * 200).decode()
    refused = layer_app.get("/v2/", headers={"Authorization": f"Basic {unknown}"})
    assert refused.status == "401 Unauthorized: wrong user name or password for nobody"
