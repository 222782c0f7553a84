"""The floor of the stack pullthrough is built on, for `make bench`: a bare Flask app under
the same gunicorn settings (deploy/gunicorn.conf.py, gevent workers) answering the bench
manifest's URLs with the same bytes and headers as pullthrough, and nothing else. What it
serves per second is the most a Flask app on this stack serves: the manifest rates are read
against it, as the blob rates are against nginx.

`gunicorn -c deploy/gunicorn.conf.py bench.floor:app`, with FLOOR_MANIFEST naming a file
holding the manifest, FLOOR_MEDIA_TYPE its type and FLOOR_DIGEST its digest."""

from __future__ import annotations

import os

from flask import Flask, Response


def create_app() -> Flask:
    with open(os.environ["FLOOR_MANIFEST"], "rb") as handle:
        body = handle.read()
    digest = os.environ["FLOOR_DIGEST"]
    headers = {
        "Content-Type": os.environ["FLOOR_MEDIA_TYPE"],
        "Content-Length": str(len(body)),
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "X-Cache": "HIT",
        "Docker-Distribution-API-Version": "registry/2.0",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    }
    floor = Flask(__name__)

    @floor.get("/v2/<path:name>/manifests/<reference>")
    def manifest(name: str, reference: str) -> Response:
        return Response(body, headers=headers, mimetype=None)

    return floor


def __getattr__(name: str) -> Flask:
    # `bench.floor:app` for gunicorn: made when gunicorn asks, not at import.
    if name == "app":
        return create_app()
    raise AttributeError(name)
