"""Command line of the cache.

python -m registry check-config
    validate the configuration and exit (2 when invalid)
python -m registry rewrite-compose --cache HOST:PORT [--registry NAME ...] [--undo] FILE ...
    route the image references of compose files through the cache (path-prefix form) for
    the given registries (default: every configured registry but the default one), in
    place; --undo takes the prefix off again
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from registry import compose
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


def rewrite_compose(args: argparse.Namespace) -> int:
    registries = set(args.registry or [])
    if not registries and not args.undo:
        try:
            settings = load_settings()
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        registries = {r.name for r in settings.registries if r.name != settings.default_registry}
        if not registries:
            print("no registry to route: configure one or pass --registry", file=sys.stderr)
            return 2
    for path in args.files:
        text = Path(path).read_bytes().decode()
        if args.undo:
            new, changed = compose.undo(text, args.cache)
        else:
            new, changed = compose.rewrite(text, args.cache, registries)
        if changed:
            Path(path).write_bytes(new.encode())
        print(f"{path}: {changed} image reference(s) {'restored' if args.undo else 'routed'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m registry")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check-config", help="validate the configuration and exit")
    rewrite = commands.add_parser(
        "rewrite-compose", help="route compose files' images through the cache, or back"
    )
    rewrite.add_argument("--cache", required=True, help="the cache as images name it: HOST:PORT")
    rewrite.add_argument(
        "--registry", action="append", help="a registry to route (repeatable; default: config)"
    )
    rewrite.add_argument("--undo", action="store_true", help="take the cache prefix off again")
    rewrite.add_argument("files", nargs="+", help="compose files, changed in place")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config()
    if args.command == "rewrite-compose":
        return rewrite_compose(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
