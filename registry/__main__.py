"""Command line: `python -m registry check-config` validates the configuration and exits."""

from __future__ import annotations

import argparse
import sys

from registry.config import ConfigError, load_settings


def check_config() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    names = ", ".join(f"{r.name} ({r.url})" for r in settings.registries)
    print(f"configuration ok: storage {settings.storage_root}, upstreams {names}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m registry")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check-config", help="validate the configuration and exit")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config()
    return 1


if __name__ == "__main__":
    sys.exit(main())
