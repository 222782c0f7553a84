"""Session-wide real servers: Redis, distribution behind a token service, seeded images."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import redis as redis_lib

from registry import create_app
from registry.config import (
    Credentials,
    LimitsSettings,
    RegistrySettings,
    Settings,
    UpstreamSettings,
)
from tests.support.fakes import FakeRegistry
from tests.support.images import Pusher, standard_images
from tests.support.servers import (
    KEYS_FILE,
    Distribution,
    RedisServer,
    ThrottledRelay,
    TokenServer,
    keys_seen,
    record_keys,
    require,
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_server(tmp_path_factory):
    server = TokenServer(tmp_path_factory.mktemp("token")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def images():
    return standard_images()


@pytest.fixture(scope="session")
def upstream(tmp_path_factory, token_server, images):
    registry = Distribution(tmp_path_factory.mktemp("upstream"), token=token_server).start()
    pusher = Pusher(registry.url, token_server.realm, token_server.service)
    for image in images.images.values():
        pusher.push(image)
    yield registry
    registry.stop()


# The bandwidth of `link`: Docker Hub over a home connection, in MiB/s.
LINK_MIBPS = 24


@pytest.fixture(scope="module")
def link(upstream):
    """The upstream behind a bandwidth-capped relay that counts what it sent."""
    relay = ThrottledRelay(upstream.port, LINK_MIBPS).start()
    yield relay
    relay.stop()


@pytest.fixture
def redis_client(redis_server):
    record_keys(redis_server.url)  # what the modules before left, for test_redis_keys
    client = redis_lib.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    record_keys(redis_server.url)
    client.close()


@pytest.fixture(scope="module")
def fake():
    """A fake upstream per test module, for faults a real registry cannot produce."""
    server = FakeRegistry().start()
    yield server
    server.stop()


@pytest.fixture
def forget_upstream_health(redis_server):
    """Forget breakers, failure counts, rate-limit records and remembered misses, for modules
    whose long-lived gunicorn stages one upstream incident per test."""
    client = redis_lib.Redis.from_url(redis_server.url)
    for pattern in ("pt:upstream:*", "pt:missing:*"):
        for key in client.scan_iter(pattern):
            client.delete(key)
    client.close()


def make_settings(root, redis_url, upstream_url, *, credentials=None, **overrides) -> Settings:
    """Settings for one docker.io upstream; `overrides` name any setting of Settings, of its
    `upstream` or of its `limits` section (`connect_timeout=2`, `max_fills=3`)."""
    registry = RegistrySettings(
        "docker.io", upstream_url, credentials=credentials, tag_ttl=overrides.pop("tag_ttl", 300)
    )
    sections = {}
    for name, cls in (("upstream", UpstreamSettings), ("limits", LimitsSettings)):
        mine = {f.name for f in dataclasses.fields(cls)}
        sections[name] = cls(**{k: overrides.pop(k) for k in list(overrides) if k in mine})
    return Settings(
        storage_root=root, redis_url=redis_url, registries=(registry,), **sections, **overrides
    )


@pytest.fixture
def settings(tmp_path, redis_server, redis_client, upstream):
    return make_settings(
        tmp_path / "data", redis_server.url, upstream.url, connect_timeout=2, read_timeout=5
    )


@pytest.fixture
def reader_settings(tmp_path, redis_server, redis_client, upstream):
    return make_settings(
        tmp_path / "data",
        redis_server.url,
        upstream.url,
        credentials=Credentials("reader", "readerpw"),
        connect_timeout=2,
        read_timeout=5,
    )


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def swift(tmp_path_factory):
    """OpenStack Swift with s3api on loopback: the S3-compatible store of the S3 tests."""
    from tests.support.swift import Swift

    server = Swift(tmp_path_factory.mktemp("swift")).start()
    server.create_bucket(SWIFT_BUCKET)
    yield server
    server.stop()


SWIFT_BUCKET = "pullthrough-tests"


def s3_section(swift, prefix: str, **extra) -> dict:
    """The `storage` config section for the Swift store, under its own key prefix."""
    from tests.support.swift import ACCESS_KEY, REGION, SECRET_KEY

    return {
        "driver": "s3",
        "s3": {
            "endpoint": swift.endpoint,
            "bucket": SWIFT_BUCKET,
            "region": REGION,
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "prefix": prefix,
            "part_size": "5MiB",
            **extra,
        },
    }


# The test modules that take long (start daemons, clusters, models, browsers), longest first.
# They are marked `slow` (`make check` leaves them out) and handed out first: with several
# test processes (make test runs four: most modules wait on daemons more than they use
# the two cores) the last module handed out is then a short one.
def model_examples(default: int) -> int:
    """How many examples a state-machine model runs: `default` in make test,
    PULLTHROUGH_MODEL_EXAMPLES in `make soak` (the models run longer there)."""
    return int(os.environ.get("PULLTHROUGH_MODEL_EXAMPLES") or default)


@pytest.fixture
def short():
    """A directory with a short path, for daemons whose unix sockets go under it (dockerd's
    containerd, containerd itself): a socket's path must fit in 108 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by Playwright: pages are read where people read
    them."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=require("chromium"), args=["--no-sandbox", "--disable-gpu"]
        )
        yield instance
        instance.close()


SLOW_MODULES = (
    "test_soak_cluster",
    "test_ranges",
    "test_tier",
    "test_auth",
    "test_fill_model",
    "test_real_clients",
    "test_faults",
    "test_freshness",
    "test_resilience",
    "test_admin",
    "test_ranges_model",
    "test_cluster",
    "test_gc",
    "test_drivers",
    "test_follow",
    "test_referrers",
    "test_signatures",
    "test_tls",
    "test_ui",
    "test_make_run",
    "test_sentinel",
    "test_containerd",
    "test_hosts",
)


def pytest_collection_modifyitems(items):
    """Slow modules marked, and first; the check of every Redis key a run left against the
    documented schema runs last."""

    def order(item) -> int:
        name = item.module.__name__.rpartition(".")[2]
        return SLOW_MODULES.index(name) if name in SLOW_MODULES else len(SLOW_MODULES)

    for item in items:
        if order(item) < len(SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
    items.sort(key=order)  # stable: each module's tests keep their order
    last = [item for item in items if item.module.__name__.endswith("test_redis_keys")]
    items[:] = [item for item in items if item not in last] + last


def pytest_configure(config):
    """With several test processes, one file collects the Redis keys every one of them saw."""
    if hasattr(config, "workerinput") or os.environ.get(KEYS_FILE):
        return
    handle, path = tempfile.mkstemp(prefix="pullthrough-keys-")
    os.close(handle)
    os.environ[KEYS_FILE] = path
    config._pullthrough_keys_file = path


def pytest_sessionfinish(session, exitstatus):
    """Every key any test process left in a test Redis is documented (test_redis_keys ran in
    one process, perhaps before another finished its last module)."""
    path = getattr(session.config, "_pullthrough_keys_file", None)
    if path is None:
        return
    from tests.test_redis_keys import undocumented

    try:
        missing = undocumented(keys_seen())
    finally:
        os.unlink(path)
    if missing and session.config.pluginmanager.hasplugin("dsession"):
        print(f"\nRedis keys no schema entry documents: {missing}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
