def test_ping_answers_with_api_version_header(client):
    response = client.get("/v2/")
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_manifest_and_blob_pull_through(client, images, upstream):
    alpine = images["alpine"]
    response = client.get("/v2/library/alpine/manifests/3.19", headers={"Accept": alpine.media_type})
    assert response.status_code == 200, response.data
    assert response.data == alpine.manifest
    child = alpine.children[0]
    response = client.get(f"/v2/library/alpine/manifests/{child.digest}")
    assert response.status_code == 200, response.data
    for digest, data in child.blobs.items():
        response = client.get(f"/v2/library/alpine/blobs/{digest}")
        assert response.status_code == 200, response.data
        assert response.data == data
