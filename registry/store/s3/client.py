"""The boto3 client of an S3-compatible store, and what its errors say."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from registry.config.settings import S3Settings, UpstreamSettings


def s3_client(
    endpoint: str | None,
    access_key: str | None,
    secret_key: str | None,
    region: str,
    *,
    path_style: bool = S3Settings.path_style,
    verify: bool | str = S3Settings.tls_verify,
    connect_timeout: float = UpstreamSettings.connect_timeout,
    read_timeout: float = UpstreamSettings.read_timeout,
    pool: int = 64,
) -> Any:
    """A boto3 S3 client for S3-compatible stores, old ones included."""
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region,
        signature_version="s3v4",
        s3={"addressing_style": "path" if path_style else "auto"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=pool,
        # Newer botocore adds CRC checksums (and aws-chunked bodies) to every upload, which
        # many S3-compatible stores refuse: only where the API requires one.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
        verify=verify,
    )
    client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
    return client


def _add_content_md5(request: Any, **_: Any) -> None:
    # DeleteObjects must carry a checksum. botocore now sends a CRC32 only, and stores that
    # predate it (Swift 2.30's s3api, older Ceph and MinIO) insist on Content-MD5.
    body = request.body
    if isinstance(body, str):
        body = body.encode()
    if isinstance(body, bytes) and "Content-MD5" not in request.headers:
        request.headers["Content-MD5"] = _md5_b64(body)


def _md5_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def status_of(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def code_of(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def is_missing(exc: Exception) -> bool:
    return status_of(exc) == 404 or code_of(exc) in ("NoSuchKey", "404", "NotFound")
