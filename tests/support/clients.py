"""Real registry clients driven by the tests: skopeo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

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
