"""`python -m workers worker|scheduler|gc`: the background jobs, their scheduler, a sweep now.

The jobs are the GC's sweeps and the follower's ticks.

worker [--burst]          run the rq worker for the `pullthrough` queue
scheduler                 enqueue one sweep every gc.interval and, when something is
                          followed, one follower tick every follow.tick (safe to run several)
gc [--dry-run] [--enqueue]
                          sweep now in this process and print the report (JSON), or hand
                          the sweep to the worker; --dry-run deletes nothing and reports
                          what would go and how many bytes it would free
"""

from __future__ import annotations

import argparse
import json
import sys

from redis.exceptions import RedisError

from registry import logs
from registry.config import load_settings_or_report
from registry.coordination import redis_address
from registry.gc import command as gc_command
from registry.memory import keep_chunk_memory
from workers.gc import QUEUE, JobScheduler, collector, enqueue, redis_client, worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_worker = commands.add_parser("worker", help="run the rq worker")
    run_worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    commands.add_parser(
        "scheduler", help="enqueue a sweep every gc.interval and the follower's ticks"
    )
    gc = commands.add_parser("gc", help="sweep now")
    gc.add_argument("--dry-run", action="store_true", help="delete nothing, report what would go")
    gc.add_argument("--enqueue", action="store_true", help="hand the sweep to the worker")
    args = parser.parse_args(argv)

    logs.configure()
    settings = load_settings_or_report()
    if settings is None:
        return 2
    client = redis_client(settings)
    try:
        client.ping()
    except RedisError as exc:
        # Nothing to work on without it: one line for the container's log, then exit (the
        # container's restart policy tries again).
        print(f"Redis at {redis_address(client)} is unreachable: {exc}", file=sys.stderr)
        return 1

    if args.command == "worker":
        keep_chunk_memory()  # the follower's fills run in the work horses it forks
        worker(client).work(burst=args.burst)
        return 0
    if args.command == "scheduler":
        JobScheduler(client, settings).start()
        return 0
    if args.enqueue:
        job = enqueue(client, dry_run=args.dry_run)
        print(json.dumps({"enqueued": job.id, "queue": QUEUE}))
        return 0
    return gc_command(collector(settings, client), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
