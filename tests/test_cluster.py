"""Several pullthrough nodes on one S3 bucket (a real Swift) and one Redis.

Two gunicorn nodes on different ports share the Redis and the bucket, and reach the real
upstream through a bandwidth-capped link (as Docker Hub over a WAN link): a herd spread over
both nodes is one upstream GET, the other node's clients get bytes before the fill completes,
a node killed mid-fill is survived by the other (which resumes from the stored pieces), and
whatever one node pulled is a cache hit on the other.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import signal
import threading
import time
import uuid

import pytest
import requests
import yaml

from registry import admin, build_pullthrough
from registry.config import settings_from_mapping
from registry.digests import Digest
from registry.gc import Collector, GcBusy
from registry.mediatypes import MANIFEST_TYPES
from registry.store import paths
from tests.conftest import s3_section
from tests.support.clients import skopeo_copy, skopeo_policy
from tests.support.images import Pusher, make_layer, single
from tests.support.servers import Gunicorn, run_module
from tests.support.stores import cache_image, needed

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}
LAYER = 40 << 20  # about 1.7 s through the link: room to act mid-fill
SHORT_TTL = 2  # tag_ttl of the nodes' short.test registry (the same upstream)


@pytest.fixture(scope="module")
def prefix():
    return f"cluster/{uuid.uuid4().hex}"


def start_node(workdir, redis_server, swift, link, prefix, **s3) -> Gunicorn:
    return Gunicorn.with_config(
        workdir,
        redis_server.url,
        [
            {"name": "docker.io", "url": link.url},
            {"name": "short.test", "url": link.url, "tag_ttl": SHORT_TTL},
        ],
        workers=2,
        storage=s3_section(swift, prefix, **s3),
        upstream={"lease_ttl": 2},
    )


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, redis_server, swift, link, prefix):
    a = start_node(tmp_path_factory.mktemp("node-a"), redis_server, swift, link, prefix)
    b = start_node(tmp_path_factory.mktemp("node-b"), redis_server, swift, link, prefix)
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def pusher(upstream, token_server):
    return Pusher(upstream.url, token_server.realm, token_server.service)


def fresh_image(pusher, name: str, size: int = LAYER):
    """An image no other test has: its one big layer is cold in every cache."""
    seed = int.from_bytes(os.urandom(4), "big")
    image = single(f"cluster/{name}", "1", [make_layer(seed, size)], docker=True)
    pusher.push(image)
    return image, max(image.blobs, key=lambda d: len(image.blobs[d]))


def manifest_of(node: Gunicorn, path: str) -> requests.Response:
    response = requests.get(f"{node.url}/v2/{path}", headers=ACCEPT, timeout=30)
    response.raise_for_status()
    return response


def get_manifest(node: Gunicorn, image) -> requests.Response:
    return manifest_of(node, f"{image.repository}/manifests/{image.tag}")


def download(url: str, t0: float) -> dict:
    """GET a blob; when its first and last byte came (seconds after t0) and its digest."""
    with requests.get(url, stream=True, timeout=60) as response:
        hasher = hashlib.sha256()
        first = None
        for chunk in response.iter_content(1 << 16):
            if first is None:
                first = time.monotonic() - t0
            hasher.update(chunk)
        return {
            "status": response.status_code,
            "digest": "sha256:" + hasher.hexdigest(),
            "first": first,
            "last": time.monotonic() - t0,
        }


def test_herd_over_two_nodes_is_one_upstream_get_and_both_stream_early(
    nodes, upstream, pusher, redis_client
):
    a, b = nodes
    image, layer = fresh_image(pusher, "herd")
    get_manifest(a, image)
    mark = upstream.mark()
    path = f"/v2/{image.repository}/blobs/{layer}"
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(download, (a if i % 2 else b).url + path, t0) for i in range(12)]
        results = [f.result() for f in futures]

    assert {r["status"] for r in results} == {200}
    assert {r["digest"] for r in results} == {layer}
    # One fill for both nodes: its ranges (the layer is past upstream.range_min_size), each a
    # 206 and asked for once (distribution logs the bytes it sent: the layer's size in all).
    gets = [s for m, p, s in upstream.requests_since(mark) if m == "GET" and layer in p]
    assert gets and set(gets) == {206}, gets
    assert upstream.body_bytes_since(mark, layer) == len(image.blobs[layer])
    # Followers on both nodes had bytes long before the fill ended (pieces, not the commit).
    fill_done = min(r["last"] for r in results)
    assert fill_done > 1.0, "the link did not make the fill last: nothing measured"
    for node_results in (results[0::2], results[1::2]):
        assert max(r["first"] for r in node_results) < fill_done - 0.5


def test_node_killed_mid_fill_is_survived_by_the_other(
    tmp_path, nodes, upstream, swift, link, prefix, redis_server, pusher, redis_client
):
    _a, b = nodes
    doomed = start_node(tmp_path / "doomed", redis_server, swift, link, prefix)
    image, layer = fresh_image(pusher, "killed")
    get_manifest(doomed, image)
    path = f"/v2/{image.repository}/blobs/{layer}"
    mark = upstream.mark()
    sent_before = link.bytes_down
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        on_doomed = pool.submit(download, doomed.url + path, t0)
        time.sleep(0.3)
        followers = [pool.submit(download, b.url + path, t0) for _ in range(3)]
        # Kill the fetching node (master and workers) once some pieces are stored.
        deadline = time.monotonic() + 10
        while not redis_client.hget(f"pt:fill:{layer}", "written") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        doomed.proc.wait()
        results = [f.result() for f in followers]
        with pytest.raises(requests.exceptions.RequestException):
            cut = on_doomed.result()
            assert cut["digest"] == layer  # (a download that finished anyway proves nothing)

    assert {r["digest"] for r in results} == {layer}
    # distribution logs a request when it ends: the cut one may come later (on a loaded
    # machine, seconds later: waiting costs nothing when it is there).
    # The first fill's ranges, and its resumption on node b: ranges again, from the pieces
    # on S3 rather than from byte 0 (the link carried far less than the layer twice).
    gets = [s for m, p, s in upstream.requests_since(mark) if m == "GET" and layer in p]
    assert gets and set(gets) == {206}, gets
    assert link.bytes_down - sent_before < 1.6 * LAYER


def test_whatever_one_node_pulled_is_a_hit_on_the_other(
    tmp_path, nodes, upstream, images, redis_client
):
    _a, b = nodes
    policy = skopeo_policy(tmp_path)
    image = images["alpine"]  # an index: two platforms, a shared layer
    host_a, host_b = (n.url.removeprefix("http://") for n in nodes)
    skopeo_copy(policy, f"{host_a}/{image.repository}:{image.tag}", tmp_path / "via-a")
    mark = upstream.mark()
    skopeo_copy(policy, f"{host_b}/{image.repository}:{image.tag}", tmp_path / "via-b")

    assert upstream.requests_since(mark) == []
    for name in os.listdir(tmp_path / "via-a"):
        assert (tmp_path / "via-a" / name).read_bytes() == (tmp_path / "via-b" / name).read_bytes()
    blob, data = max(image.children[0].blobs.items(), key=lambda item: len(item[1]))
    url = f"{b.url}/v2/{image.repository}/blobs/{blob}"
    assert requests.head(url, timeout=10).headers["X-Cache"] == "HIT"
    ranged = requests.get(url, headers={"Range": "bytes=1000-1999"}, timeout=10)
    assert ranged.status_code == 206 and ranged.content == data[1000:2000]
    assert ranged.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    # The UI and the admin CLI read the same bucket.
    page = requests.get(f"{b.url}/ui/repositories/{image.repository}", timeout=10)
    assert page.status_code == 200 and image.tag in page.text
    listed = run_module("registry", b.config_path, "images")
    assert f"{image.repository}:{image.tag}" in listed.stdout, listed.stdout


def test_a_cached_manifest_asks_the_bucket_nothing_and_a_moved_tag_reaches_every_node(
    nodes, swift, pusher
):
    """Each process reads a fresh tag's record from the bucket once, a revision's once; a
    tag another node moves (the follower, admin refresh) is read again by every process at
    once, and an evicted one is fetched again."""
    a, b = nodes
    image, _ = fresh_image(pusher, "remembered", 1 << 20)
    repo = f"docker.io/{image.repository}"
    tag_key, revision_key = (
        paths.tag(repo, image.tag),
        paths.revision(repo, Digest.parse(image.digest)),
    )
    get_manifest(a, image)  # node a fetches and stores it

    def revision_asked() -> int:
        return swift.object_requests("GET", revision_key) + swift.object_heads(revision_key)

    reads, asked = swift.object_gets(tag_key), revision_asked()
    for _ in range(20):
        assert get_manifest(b, image).content == image.manifest
        assert manifest_of(b, f"{image.repository}/manifests/{image.digest}").status_code == 200
    time.sleep(1)  # the proxy logs a request when it ends
    # At most one read per process of node b (2 workers): 20 each without the memory; a
    # revision is read once per process, then a HEAD per request without it.
    assert swift.object_gets(tag_key) - reads <= 2
    assert revision_asked() - asked <= 2

    # The tag moves upstream; node a is told to fetch it now (as the follower does).
    moved = single(image.repository, image.tag, [make_layer(7, 1 << 20)], docker=True)
    pusher.push(moved)
    pt = build_pullthrough(settings_from_mapping(yaml.safe_load(a.config_path.read_text()), env={}))
    ref = f"{image.repository}:{image.tag}"
    assert admin.refresh(pt, ref) == str(moved.digest)
    for _ in range(4):  # both processes of node b
        assert get_manifest(b, image).content == moved.manifest

    admin.evict(pt, ref)
    assert get_manifest(b, image).headers["X-Cache"] == "MISS"


def test_a_tag_that_moves_upstream_is_seen_by_every_node_within_its_tag_ttl(nodes, pusher):
    """No node is told: each process's remembered record ends with the tag's freshness."""
    image, _ = fresh_image(pusher, "drifting", 1 << 20)
    path = f"short.test/{image.repository}/manifests/{image.tag}"
    for node in nodes:
        for _ in range(4):
            assert manifest_of(node, path).content == image.manifest
    moved = single(image.repository, image.tag, [make_layer(8, 1 << 20)], docker=True)
    pusher.push(moved)
    time.sleep(SHORT_TTL + 0.5)
    for node in nodes:
        for _ in range(4):
            assert manifest_of(node, path).content == moved.manifest


def test_redirect_mode_sends_clients_to_a_presigned_url(
    tmp_path, nodes, upstream, swift, link, prefix, redis_server, images, redis_client
):
    a, _b = nodes
    image = images["busybox"]
    layer = next(iter(image.blobs))
    get_manifest(a, image)
    requests.get(f"{a.url}/v2/{image.repository}/blobs/{layer}", timeout=30).raise_for_status()
    node = start_node(tmp_path / "redirect", redis_server, swift, link, prefix, redirect=True)
    try:
        url = f"{node.url}/v2/{image.repository}/blobs/{layer}"
        direct = requests.get(url, allow_redirects=False, timeout=10)
        assert direct.status_code == 307
        assert direct.headers["Location"].startswith(swift.endpoint + "/")
        assert "X-Amz-Signature=" in direct.headers["Location"]
        followed = requests.get(url, timeout=10)
        assert Digest.parse(layer).matches(followed.content)
        ranged = requests.get(url, headers={"Range": "bytes=0-99"}, timeout=10)
        assert ranged.status_code == 206 and ranged.content == image.blobs[layer][:100]
        policy = skopeo_policy(tmp_path)
        host = node.url.removeprefix("http://")
        skopeo_copy(policy, f"{host}/{image.repository}:{image.tag}", tmp_path / "pulled")
        assert (tmp_path / "pulled" / layer.split(":")[1]).read_bytes() == image.blobs[layer]
    finally:
        node.stop()


def test_gc_on_s3_keeps_what_manifests_need_and_runs_once_cluster_wide(
    tmp_path, swift, redis_server, redis_client, images, upstream
):
    config = {
        "storage": s3_section(swift, f"gc/{uuid.uuid4().hex}"),
        "redis": {"url": redis_server.url},
        "registries": [{"name": "docker.io", "url": upstream.url}],
        "gc": {"delay": 0},
    }
    pt = build_pullthrough(settings_from_mapping(config, env={}))
    store = pt.store
    kept = images["busybox"]
    cache_image(store, kept)
    orphan = os.urandom(1000)
    orphan_digest = Digest.parse("sha256:" + hashlib.sha256(orphan).hexdigest())
    store.put_verified_bytes(orphan_digest, orphan)
    stale = store.open_upload(Digest.parse("sha256:" + "e" * 64), 6 << 20)
    stale.pwrite(os.urandom(6 << 20), 0)  # a piece of a fill whose node died

    # Two nodes' schedulers fire at once: one sweeps, the other is told it is busy.
    results: list = []

    def sweep() -> None:
        try:
            results.append(admin.collector(pt).run())
        except GcBusy as exc:
            results.append(exc)

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    hold = pt.coord.gc.lease()
    assert hold.acquire()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(r, GcBusy) for r in results)
    hold.release()
    # S3 stores round Last-Modified up to the second: look from a moment later.
    report = Collector(store, pt.coord, pt.settings.gc, clock=lambda: time.time() + 5).run()

    assert report["deleted_blobs"] == 1 and report["deleted_uploads"] == 1
    assert store.blob_size(orphan_digest) is None
    assert {str(d) for d, _size, _mtime in store.iter_blobs()} == needed(kept)
    assert list(store.iter_uploads()) == []
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    verified = run_module("registry", path, "verify", check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_unreachable_store_is_a_503_naming_it_in_the_log_and_the_node_still_starts(
    tmp_path, redis_server, redis_client, upstream, images, caplog
):
    from registry import create_app
    from tests.support.servers import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    config = {
        "storage": {"driver": "s3", "s3": {"bucket": "gone", "endpoint": endpoint}},
        "redis": {"url": redis_server.url},
        "registries": [{"name": "docker.io", "url": upstream.url}],
        "upstream": {"connect_timeout": 0.5},
    }
    client = create_app(settings_from_mapping(config, env={})).test_client()
    image = images["busybox"]
    for path in (
        f"/v2/{image.repository}/blobs/{next(iter(image.blobs))}",
        f"/v2/{image.repository}/manifests/{image.tag}",
    ):
        response = client.get(path, headers=ACCEPT)
        assert response.status_code == 503, (path, response.data)
        assert response.status == "503 cache storage failed: Input/output error"
        # Clients learn the kind of failure; where the store is goes to the log only.
        message = response.get_json()["errors"][0]["message"]
        assert message == "the cache's storage failed: Input/output error", message
        assert endpoint not in response.get_data(as_text=True)
    assert f"S3 bucket gone at {endpoint}" in caplog.text
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["storage"]["ok"] is False
