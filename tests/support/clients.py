"""Real registry clients driven by the tests: skopeo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import requests

from tests.support.servers import require


def skopeo_policy(directory: Path) -> Path:
    path = directory / "policy.json"
    path.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return path


def skopeo_copy(
    policy: Path, source: str, dest: Path, *creds: str, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess:
    """`skopeo copy --all docker://source dir:dest` over plain HTTP, without retries."""
    return subprocess.run(
        [
            require("skopeo"),
            "--policy",
            str(policy),
            "copy",
            "--all",
            "--retry-times",
            "0",
            "--src-tls-verify=false",
            *creds,
            f"docker://{source}",
            f"dir:{dest}",
        ],
        check=check,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fetch(url: str, **kwargs) -> tuple[int, bytes, bool]:
    """(status, body, complete) of a streamed GET: complete is False when the body was cut
    short; (-1, b"", False) when the connection broke before the body could be read."""
    try:
        with requests.get(url, stream=True, timeout=60, **kwargs) as response:
            body = b"".join(response.iter_content(1 << 16))
            expected = response.headers.get("Content-Length")
            return response.status_code, body, expected is None or int(expected) == len(body)
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
        return -1, b"", False
