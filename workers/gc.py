"""The GC job and the scheduling of the background jobs, on rq.

`sweep` is the GC's rq job (the follower's is workers/follow.py's `tick`). `JobScheduler` is
rq's CronScheduler with the one thing it lacks: a Redis slot (`pt:gc:scheduled`, SET NX for
0.9 x interval; `pt:follow:scheduled` for the follower's ticks) so that several schedulers,
or one restarted, enqueue each interval's job once. The sweep itself also holds `pt:gc:lock`,
so a manual run and a scheduled one never overlap.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from rq import Queue, Worker
from rq.cron import CronJob, CronScheduler
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from registry import build_collector
from registry.config import Settings, load_settings
from registry.coordination import Coordination, connect
from registry.gc import Collector, GcBusy
from workers.follow import tick as follow_tick

log = logging.getLogger(__name__)

QUEUE = "pullthrough"
# The functions a job may name (GcJob): nothing else in the queue runs.
JOBS = frozenset({f"{__name__}.sweep", "workers.follow.tick"})
# A sweep of a large store takes minutes; rq's default job timeout (180 s) would kill it.
JOB_TIMEOUT = 6 * 3600


def redis_client(settings: Settings) -> redis.Redis:
    return connect(settings, socket_timeout=30, connect_timeout=5)


def collector(settings: Settings, client: redis.Redis | None = None) -> Collector:
    return build_collector(settings, client or redis_client(settings))


def sweep(dry_run: bool = False) -> dict:
    """The rq job: one collection with the settings of this process's environment."""
    try:
        return collector(load_settings()).run(dry_run=dry_run)
    except GcBusy as exc:
        log.info("gc skipped: %s", exc)
        return {"skipped": str(exc)}


class RefusedJob(Exception):
    """A job in the queue that pullthrough did not put there."""


class GcJob(Job):
    """A job of the `pullthrough` queue: JSON, never pickle, only functions named in JOBS,
    and no callbacks. rq runs whatever a job names, and whoever can write to Redis can write
    a job: with pickle that is code, with JSON a dotted name and arguments (`os.system`) or
    a callback (`builtins.print`). All of them stop here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["serializer"] = JSONSerializer
        super().__init__(*args, **kwargs)

    @property
    def func(self) -> Any:
        callbacks = [
            name
            for name in (
                self._success_callback_name,
                self._failure_callback_name,
                self._stopped_callback_name,
            )
            if name
        ]
        if self.func_name not in JOBS or self.instance is not None or callbacks:
            named = ", ".join([repr(self.func_name), *map(repr, callbacks)])
            raise RefusedJob(f"job {self.id} names {named}, not a pullthrough job")
        return super().func

    # pullthrough's jobs have no callbacks; one that names any (anything importable, run
    # when the job succeeds, fails or stops) is refused above and never called here.
    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None


def queue(client: redis.Redis) -> Queue:
    return Queue(QUEUE, connection=client, serializer=JSONSerializer, job_class=GcJob)


def worker(client: redis.Redis) -> Worker:
    return Worker([queue(client)], connection=client, serializer=JSONSerializer, job_class=GcJob)


def enqueue(client: redis.Redis, dry_run: bool = False) -> Job:
    return queue(client).enqueue(
        sweep, kwargs={"dry_run": dry_run}, job_timeout=JOB_TIMEOUT, result_ttl=7 * 86400
    )


class JobScheduler(CronScheduler):
    """Enqueues the sweep every `gc.interval` seconds and, when something is followed, the
    follower's tick every `follow.tick` seconds, each once across all schedulers."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(connection=client, name="")
        self.interval = settings.gc.interval
        self.tick = settings.follow.tick
        self.coord = Coordination(client, settings.upstream.lease_ttl)
        self.register(sweep, QUEUE, interval=int(self.interval), job_timeout=JOB_TIMEOUT)
        if settings.follow.enabled:
            self.register(follow_tick, QUEUE, interval=max(1, int(self.tick)))

    def enqueue_jobs(self) -> list[CronJob]:
        enqueued = []
        now = rq_now()
        for job in self.get_jobs():
            if not job.should_run():
                continue
            # As JSON (rq's CronJob.enqueue would pickle).
            if job.func_name == "workers.follow.tick":
                if self.coord.follows.take_tick(self.coord.owner, self.tick):
                    queue(self.connection).enqueue(
                        follow_tick, job_timeout=JOB_TIMEOUT, result_ttl=3600
                    )
                    enqueued.append(job)
            elif self.coord.gc.take_slot(self.interval):
                enqueue(self.connection)
                enqueued.append(job)
            else:
                log.info("gc: another scheduler enqueued this interval's sweep")
            # Either way this scheduler waits a whole interval before trying again.
            job.set_enqueue_time(now)
        return enqueued
