"""podman and the Docker daemon, set up as the README tells people to, pull every test image
through the cache (the private one with the cache's credentials, none of the client's), pull
cached images with the upstream stopped, and what they print for a missing tag, a missing
repository, an upstream that rate-limits and an uncached image with the upstream down
carries the cause the cache knows.

podman prints the mirror's answer ("Mirrors also failed: [...]"). The Docker daemon falls
back from a mirror to Docker Hub on any error and prints only that last error; the mirror's
answer is in the daemon's own log ("Attempting next endpoint for pull after error: ..."),
which is where an operator reads it (`journalctl -u docker`). Here Docker Hub is a dead
loopback proxy, so nothing leaves the machine.
"""

from __future__ import annotations

import time

import pytest

from tests.support.clients import Dockerd, Podman
from tests.support.fakes import Route
from tests.support.images import Pusher
from tests.support.servers import Distribution, Gunicorn

IMAGES = ["alpine", "busybox", "multidocker", "ocisingle", "big", "private"]


@pytest.fixture(scope="module")
def own_upstream(tmp_path_factory, token_server, images):
    """A distribution of this module's own: the last tests stop it."""
    registry = Distribution(tmp_path_factory.mktemp("clients-upstream"), token=token_server)
    registry.start()
    pusher = Pusher(registry.url, token_server.realm, token_server.service)
    for name in IMAGES:
        pusher.push(images[name])
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def limited(fake):
    """An upstream that rate-limits every manifest request, as Docker Hub does past its quota."""
    body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"pull rate limit"}]}'
    headers = {"Retry-After": "1", "ratelimit-limit": "100;w=21600"}
    for path in ("/v2/library/quota/manifests/1", "/v2/org/quota/manifests/1"):
        fake.routes[path] = Route(status=429, body=body, headers=headers)
    return fake


@pytest.fixture(scope="module")
def cache(tmp_path_factory, redis_server, own_upstream, limited):
    docker_io = {"name": "docker.io", "url": own_upstream.url}
    server = Gunicorn.with_config(
        tmp_path_factory.mktemp("clients-cache"),
        redis_server.url,
        [
            {**docker_io, "username": "reader", "password": "readerpw"},
            {"name": "limited.test", "url": limited.url},
        ],
        workers=2,
        upstream={"negative_ttl": 0, "breaker_backoff": 1},
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def podman(tmp_path_factory, cache):
    client = Podman(tmp_path_factory.mktemp("podman"))
    mirror = f"127.0.0.1:{cache.port}"
    client.mirror({"docker.io": mirror, "limited.test": f"{mirror}/limited.test"})
    yield client
    client.close()


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory, cache):
    daemon = Dockerd(tmp_path_factory.mktemp("dockerd"), f"http://127.0.0.1:{cache.port}")
    daemon.start()
    yield daemon
    daemon.stop()


def ref(image) -> str:
    return f"docker.io/{image.repository}:{image.tag}"


def podman_pull(podman, reference: str):
    return podman.run("pull", "--quiet", reference)


def docker_log_since(dockerd, mark: int) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "Attempting next endpoint" not in dockerd.log()[mark:]:
        time.sleep(0.1)
    return dockerd.log()[mark:]


@pytest.mark.parametrize("name", IMAGES)
def test_podman_pulls_every_test_image_through_the_mirror(podman, images, name):
    image = images[name]
    pulled = podman_pull(podman, ref(image))
    assert pulled.returncode == 0, pulled.stderr
    digest = podman.run("image", "inspect", "--format", "{{.Digest}}", ref(image)).stdout
    assert digest.strip() == image.digest


@pytest.mark.parametrize("name", IMAGES)
def test_docker_pulls_every_test_image_through_the_mirror(dockerd, images, name):
    image = images[name]
    pulled = dockerd.docker("pull", ref(image), check=False)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    digests = dockerd.docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref(image))
    assert f"@{image.digest}" in digests.stdout


def test_podman_names_a_missing_tag_and_a_missing_repository(podman):
    tag = podman_pull(podman, "docker.io/library/busybox:nosuchtag")
    assert tag.returncode != 0
    assert "upstream docker.io has no tag nosuchtag in library/busybox" in tag.stderr, tag.stderr
    # distribution answers MANIFEST_UNKNOWN for a tag of a repository it does not have.
    repo = podman_pull(podman, "docker.io/library/nosuchrepo:1")
    assert repo.returncode != 0
    assert "upstream docker.io has no tag 1 in library/nosuchrepo" in repo.stderr, repo.stderr


def test_docker_daemon_names_a_missing_tag_and_a_missing_repository(dockerd):
    mark = len(dockerd.log())
    assert dockerd.docker("pull", "busybox:nosuchtag", check=False).returncode != 0
    assert dockerd.docker("pull", "nosuchrepo:1", check=False).returncode != 0
    log = docker_log_since(dockerd, mark)
    assert "upstream docker.io has no tag nosuchtag in library/busybox" in log, log[-3000:]
    assert "upstream docker.io has no tag 1 in library/nosuchrepo" in log


def test_podman_prints_the_cause_of_a_rate_limit(podman):
    limited = podman_pull(podman, "limited.test/org/quota:1")
    assert limited.returncode != 0
    # podman reads a 4xx body: the message says the same as the status line.
    expected = "upstream limited.test is rate-limiting this cache, and this is not cached; retry"
    assert expected in limited.stderr, limited.stderr


def test_with_the_upstream_stopped_cached_images_pull_and_uncached_ones_name_the_cause(
    podman, dockerd, own_upstream, images
):
    own_upstream.stop()
    for name in ("busybox", "alpine"):
        image = images[name]
        podman.run("rmi", "--force", ref(image))
        pulled = podman_pull(podman, ref(image))
        assert pulled.returncode == 0, pulled.stderr
        dockerd.docker("rmi", "--force", ref(image))
        pulled = dockerd.docker("pull", ref(image), check=False)
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr

    down = podman_pull(podman, "docker.io/library/nevercached:1")
    assert down.returncode != 0
    assert "503 docker.io unreachable (refused the connection), not cached" in down.stderr, (
        down.stderr
    )
    mark = len(dockerd.log())
    assert dockerd.docker("pull", "nevercached:1", check=False).returncode != 0
    log = docker_log_since(dockerd, mark)
    assert "503 docker.io unreachable (refused the connection), not cached" in log, log[-3000:]


def test_docker_daemon_logs_the_rate_limit_of_its_mirror(dockerd, cache, limited, tmp_path):
    """Docker's mirror is for docker.io only: the cache comes back on the same port with
    docker.io behind the rate-limiting upstream."""
    cache.stop()
    # Another Redis database: the docker.io breaker the outage above opened stays behind.
    text = cache.config_path.read_text()
    assert text.count("/0\n") == 1
    config = (
        text.replace("name: docker.io", "name: docker.io-was")
        .replace("name: limited.test", "name: docker.io")
        .replace("/0\n", "/1\n")
    )
    path = tmp_path / "limited.yaml"
    path.write_text(config)
    again = Gunicorn(path, tmp_path / "limited-cache", workers=1)
    again.port = cache.port
    again.start()
    try:
        mark = len(dockerd.log())
        assert dockerd.docker("pull", "quota:1", check=False).returncode != 0
        log = docker_log_since(dockerd, mark)
        expected = "upstream docker.io is rate-limiting this cache, and this is not cached; retry"
        assert expected in log, log[-3000:]
    finally:
        again.stop()
