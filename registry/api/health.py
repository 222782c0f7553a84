"""Health endpoints for orchestrators: `/healthz` (the process answers) and `/readyz` (Redis
answers, the storage root is writable, free disk is above `storage.min_free`). `/v2/` stays
the cheap liveness check clients and the user's setup already use."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from flask import Blueprint, Response, current_app, jsonify
from redis.exceptions import RedisError

from registry.pullthrough.service import PullThrough

bp = Blueprint("health", __name__)

# /readyz writes and syncs a probe file: a flood of probes must not become a flood of writes.
READY_FOR = 5.0


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok", pid=os.getpid())


@bp.get("/readyz")
def readyz() -> Response:
    """The checks below, run at most once per READY_FOR seconds in each process."""
    last = current_app.extensions.setdefault("readyz", {"at": -READY_FOR, "answer": None})
    now = time.monotonic()
    if now - last["at"] >= READY_FOR:
        last["answer"], last["at"] = _checks(current_app.extensions["pullthrough"]), now
    ready, checks = last["answer"]
    response = jsonify(status="ready" if ready else "not ready", checks=checks)
    response.status_code = 200 if ready else 503
    return response


def _checks(pt: PullThrough) -> tuple[bool, dict[str, dict]]:
    checks: dict[str, dict] = {}
    try:
        pt.coord.ping()
        checks["redis"] = {"ok": True}
    except RedisError as exc:
        checks["redis"] = {"ok": False, "error": f"Redis unreachable: {type(exc).__name__}"}
    try:
        pt.store.probe_writable(f"readyz-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        checks["storage"] = {"ok": True}
    except OSError as exc:
        checks["storage"] = {"ok": False, "error": f"storage not writable: {exc.strerror}"}
    if pt.settings.s3 is None:  # a bucket's space is its provider's business
        checks["disk"] = _disk(pt.settings.storage_root, pt.settings.min_free_bytes)
    return all(check["ok"] for check in checks.values()), checks


def _disk(root: Path, min_free: int) -> dict[str, object]:
    try:
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return {"ok": False, "error": f"cannot read free space: {exc.strerror}"}
    check: dict[str, object] = {
        "ok": free >= min_free,
        "free_bytes": free,
        "min_free_bytes": min_free,
    }
    if not check["ok"]:
        check["error"] = "free disk space below storage.min_free"
    return check
