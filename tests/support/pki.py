"""A private CA for the TLS tests, made with the cache's own `python -m registry tls`: the
server's certificate for localhost and 127.0.0.1, a client certificate `nuc`, one from
another CA (`stranger`) and an expired one."""

from __future__ import annotations

import datetime
from pathlib import Path

from registry import tls
from tests.support.servers import run_module


def make_pki(directory: Path) -> tuple[str, str]:
    """The CA in `directory`; returns what `tls init` and `tls client nuc` printed."""
    config = directory / "unused.yaml"
    config.write_text("{}\n")
    init = run_module(
        "registry", config, "tls", "init", "--host", "localhost", "--ip", "127.0.0.1",
        "--dir", str(directory),
    ).stdout  # fmt: skip
    client = run_module(
        "registry", config, "tls", "client", "nuc", "--host", "localhost", "--dir", str(directory)
    ).stdout
    other = directory / "other-ca"
    tls.create_ca(other)
    tls.issue(other, "stranger", server=False)
    tls.issue(
        directory,
        "expired",
        server=False,
        not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10),
        days=1,
    )
    return init, client


def client_files(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.crt", directory / f"{name}.key"
