"""Command line of the cache.

python -m registry check-config
    validate the configuration and exit (2 when invalid)
python -m registry follow [--now]
    check the followed tags that are due (all of them with --now) and fetch what moved
python -m registry tls init --host NAME [--ip ADDR ...] [--port PORT] [--dir DIR]
    a private CA and the cache's server certificate in DIR (default ./tls), and what to
    configure on the cache and on each engine's host
python -m registry tls client NAME [--host NAME] [--port PORT] [--dir DIR]
    a client certificate for one host, signed by that CA, and where each engine wants it
python -m registry rewrite-compose --cache HOST:PORT [--registry NAME ...] [--undo] FILE ...
    route the image references of compose files through the cache (path-prefix form) for
    the given registries (default: every configured registry but the default one), in
    place; --undo takes the prefix off again
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import redis

from registry import admin, build_pullthrough, compose, logs
from registry.config import config_warnings, load_settings_or_report
from registry.gc import GcBusy
from registry.gc import command as gc_command


def check_config() -> int:
    settings = load_settings_or_report()
    if settings is None:
        return 2
    names = ", ".join(f"{r.name} ({r.url})" for r in settings.registries)
    print(f"configuration ok: storage {settings.storage_root}, upstreams {names}")
    for warning in config_warnings(settings):
        print(f"warning: {warning}")
    return 0


def rewrite_compose(args: argparse.Namespace) -> int:
    registries = set(args.registry or [])
    if not registries and not args.undo:
        settings = load_settings_or_report()
        if settings is None:
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


def tls_command(args: argparse.Namespace) -> int:
    from registry import tls

    directory = Path(args.dir).resolve()
    if args.tls_command == "init":
        ca = tls.create_ca(directory)
        server = tls.issue(
            directory, args.host, server=True, hosts=[args.host], ips=args.ip or [], days=args.days
        )
        print(f"CA: {ca.certificate} (its key {ca.key} stays here: it signs client certificates)")
        names = ", ".join([args.host, *(args.ip or [])])
        print(f"server certificate: {server.certificate} for {names}")
        print("\nIn the cache's config:")
        print(f"server:\n  tls:\n    cert: {server.certificate}\n    key: {server.key}")
        print(f"    # client_ca: {ca.certificate}  # to serve only hosts with a client certificate")
        print(f"\nOn each host that pulls ({args.host}:{args.port}):")
        print(tls.engine_placement(f"{args.host}:{args.port}", ca.certificate, None))
        return 0
    ca_files = [directory / name for name in tls.CA_FILES]
    if not all(path.exists() for path in ca_files):
        print(f"no CA in {directory}: run `python -m registry tls init` first", file=sys.stderr)
        return 1
    client = tls.issue(
        directory, args.name, server=False, days=args.days, out=directory / "clients"
    )
    print(f"client certificate for {args.name}: {client.certificate}, key {client.key}")
    print(f"\nOn {args.name}:")
    print(tls.engine_placement(f"{args.host}:{args.port}", ca_files[0], client))
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
    commands.add_parser("images", help="list cached images")
    warm = commands.add_parser("warm", help="fetch images into the cache")
    warm.add_argument("images", nargs="+", help="name[:tag|@digest], as a client writes it")
    follow = commands.add_parser("follow", help="check the followed tags that are due")
    follow.add_argument("--now", action="store_true", help="check every followed tag now")
    evict = commands.add_parser("evict", help="drop a cached tag")
    evict.add_argument("image", help="name:tag")
    verify = commands.add_parser("verify", help="re-hash stored content")
    verify.add_argument("--delete", action="store_true", help="remove corrupt blobs")
    commands.add_parser("rebuild-index", help="rebuild the Redis indexes from disk")
    commands.add_parser("ratelimit", help="show upstream quota and breaker state")
    gc = commands.add_parser("gc", help="collect garbage now")
    gc.add_argument("--dry-run", action="store_true", help="report only")
    tls = commands.add_parser("tls", help="a private CA, server and client certificates")
    tls_commands = tls.add_subparsers(dest="tls_command", required=True)
    init = tls_commands.add_parser("init", help="a private CA and the server's certificate")
    init.add_argument("--host", required=True, help="the name clients reach the cache by")
    init.add_argument("--ip", action="append", help="an address clients use (repeatable)")
    client = tls_commands.add_parser("client", help="a client certificate for one host")
    client.add_argument("name", help="the host's name: its name in the logs and on the Hosts page")
    client.add_argument("--host", default="CACHE", help="the cache's name, for the paths shown")
    for sub in (init, client):
        sub.add_argument("--port", type=int, default=5050, help="the cache's port (default 5050)")
        sub.add_argument("--dir", default="tls", help="where the CA and certificates are (./tls)")
        sub.add_argument("--days", type=int, default=825, help="validity in days (825)")
    args = parser.parse_args(argv)
    if args.command == "tls":
        return tls_command(args)
    if args.command == "check-config":
        return check_config()
    if args.command == "rewrite-compose":
        return rewrite_compose(args)
    return admin_command(args)


def admin_command(args: argparse.Namespace) -> int:
    logs.configure(quiet=True)
    settings = load_settings_or_report()
    if settings is None:
        return 2
    pt = build_pullthrough(settings)
    try:
        if args.command == "images":
            for item in admin.images(pt):
                row = item["row"]
                platforms = ",".join(row.platforms) or "-"
                size = f"{row.size / 2**20:.1f}MiB" if row.size is not None else "-"
                last = (
                    time.strftime("%Y-%m-%d %H:%M", time.localtime(row.last_pulled))
                    if (row.last_pulled)
                    else "never"
                )
                print(
                    f"{item['image']}\t{row.digest}\t{platforms}\t{size}\t"
                    f"last pulled {last}\t{row.pulls} pulls"
                )
            return 0
        if args.command == "warm":
            return admin.warm(pt, args.images)
        if args.command == "follow":
            return admin.follow(pt, args.now)
        if args.command == "evict":
            digest = admin.evict(pt, args.image)
            print(f"evicted {args.image} ({digest}); `python -m registry gc` frees its blobs")
            return 0
        if args.command == "verify":
            return admin.verify(pt, args.delete)
        if args.command == "rebuild-index":
            print(json.dumps(admin.rebuild_index(pt)))
            return 0
        if args.command == "ratelimit":
            for line in admin.ratelimit(pt):
                print(json.dumps(line))
            return 0
        if args.command == "gc":
            return gc_command(admin.collector(pt), args.dry_run)
    except (LookupError, ValueError, GcBusy) as exc:
        print(str(exc).strip("'\""), file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"Redis is unreachable: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the store: a full or read-only disk, an S3 endpoint down
        print(f"the storage failed: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
