"""Health endpoints for orchestrators: `/healthz` (the process answers) and `/readyz` (Redis
answers, the storage root is writable, free disk is above `storage.min_free`). `/v2/` stays
the cheap liveness check clients and the user's setup already use."""

from __future__ import annotations

import os
import shutil
import uuid

from flask import Blueprint, current_app, jsonify
from redis.exceptions import RedisError

from registry.pullthrough import PullThrough

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok", pid=os.getpid())


@bp.get("/readyz")
def readyz():
    pt: PullThrough = current_app.extensions["pullthrough"]
    checks: dict[str, dict] = {}
    try:
        pt.coord.redis.ping()
        checks["redis"] = {"ok": True}
    except RedisError as exc:
        checks["redis"] = {"ok": False, "error": f"Redis unreachable: {type(exc).__name__}"}
    probe = f"tmp/readyz-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pt.store.driver.write_atomic(probe, b"ok")
        pt.store.driver.delete(probe)
        checks["storage"] = {"ok": True}
    except OSError as exc:
        checks["storage"] = {"ok": False, "error": f"storage not writable: {exc.strerror}"}
    if pt.settings.s3 is None:  # a bucket's space is its provider's business
        checks["disk"] = _disk(pt.settings.storage_root, pt.settings.min_free_bytes)
    ready = all(check["ok"] for check in checks.values())
    response = jsonify(status="ready" if ready else "not ready", checks=checks)
    response.status_code = 200 if ready else 503
    return response


def _disk(root, min_free: int) -> dict:
    try:
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return {"ok": False, "error": f"cannot read free space: {exc.strerror}"}
    check = {"ok": free >= min_free, "free_bytes": free, "min_free_bytes": min_free}
    if not check["ok"]:
        check["error"] = "free disk space below storage.min_free"
    return check
