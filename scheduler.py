"""Scheduler entry point: `python scheduler.py` moves due jobs onto their queues, every second.

One loop runs three schedulers:
- rq-scheduler, for delayed jobs (`delay_seconds` / `send_at`), with its lock so that only one
  of several scheduler processes moves jobs at a time;
- RQ's own scheduler, for the delays of RQ's `Retry`, so retries move on even where only plain
  `rq worker` processes (without `--with-scheduler`) run. It holds a lock per queue;
- RQ's cron scheduler, for the periodic jobs of `cron.py`, each run claimed once in Redis
  (`ExactlyOnceCronScheduler`), so that any number of scheduler processes enqueue each run once.

Every `RECOVERY_SWEEP_SECONDS` it also runs `recovery.sweep`, so that the jobs of killed workers are
retried (or failed) even while no worker is alive to run RQ's registry maintenance.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterable

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.cron import CronScheduler
from rq.exceptions import SchedulerNotFound
from rq.scheduler import RQScheduler

from herald.infra import connections
from herald.infra.logs import setup_logging_from
from herald.jobs import cron
from herald.rq_seam import recovery
from herald.rq_seam.schedulers import DelayedJobScheduler
from herald.rq_seam.schedulers import ExactlyOnceCronScheduler as ExactlyOnceCronScheduler
from settings import QUEUE_NAMES, Settings, settings_or_exit
from tasks import TASKS

log = logging.getLogger("scheduler")


def periodic_scheduler(connection: Redis, settings: Settings, jobs: Iterable[cron.PeriodicJob]) -> CronScheduler:
    """RQ's cron scheduler (exactly once per run) with each declared job, on its priority's queue."""
    scheduler = ExactlyOnceCronScheduler(connection=connection)
    for job in jobs:
        scheduler.register(
            TASKS[job.task].func,
            queue_name=job.priority,
            kwargs=dict(job.args),
            interval=job.interval,
            cron=job.cron,
            job_timeout=settings.job_timeout_seconds,
            result_ttl=settings.result_ttl_seconds,
            failure_ttl=settings.failure_ttl_seconds,
            meta={"task": job.task, "periodic_job": job.name},
            name=job.name,
        )
    return scheduler


class SchedulerLoop:
    def __init__(self, connection: Redis, settings: Settings, periodic: CronScheduler | None = None) -> None:
        interval = settings.scheduler_interval_seconds
        self.connection = connection
        self.interval = interval
        self.sweep_every = settings.recovery_sweep_seconds
        self.claim_grace = settings.job_heartbeat_grace_seconds
        self.next_sweep = 0.0
        self.delayed = DelayedJobScheduler(connection=connection, interval=interval)
        self.retries = RQScheduler(list(QUEUE_NAMES), connection=connection, interval=max(1, round(interval)))
        self.periodic = periodic or ExactlyOnceCronScheduler(connection=connection)
        self.stopping = False

    def tick(self) -> None:
        if self.delayed.acquire_lock():
            try:
                self.delayed.enqueue_jobs()
            finally:
                self.delayed.remove_lock()
        if self.retries.acquired_locks != set(QUEUE_NAMES):
            self.retries.acquire_locks()  # at once, not only every two minutes as RQ's own loop does
        self.retries.heartbeat()
        self.retries.enqueue_scheduled_jobs()
        self.delayed.heartbeat()
        if self.periodic.enqueue_jobs():
            self.periodic.save()  # the last and next run times, for RQ's monitoring
        self.periodic.heartbeat()
        if time.monotonic() >= self.next_sweep:
            self.next_sweep = time.monotonic() + self.sweep_every
            self.sweep()

    def sweep(self) -> None:
        """Recover the jobs of killed workers; a job that cannot be loaded must not stop the loop."""
        try:
            recovery.sweep(self.connection, self.claim_grace)
        except (RedisConnectionError, RedisTimeoutError):
            raise
        except Exception:
            log.exception("recovery sweep failed")

    def run(self) -> None:
        if not self.register_births():
            return
        try:
            while not self.stopping:
                started = time.monotonic()
                try:
                    self.tick()
                except (RedisConnectionError, RedisTimeoutError) as exc:  # Redis away: wait, then go on
                    log.warning("redis unavailable (%s); retrying in %.1f s", type(exc).__name__, self.interval)
                time.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            self.leave()

    def register_births(self) -> bool:
        """Enter RQ's scheduler registries, waiting for Redis as the loop does if it is away at the start
        (a scheduler started with Redis down, or just as it went down, must not quit); False if stopped first."""
        births = [self.delayed.register_birth, self.retries.register_birth, self.periodic.register_birth]
        while not self.stopping:
            try:
                while births:
                    births[0]()
                    births.pop(0)  # each once: rq-scheduler refuses a second birth of a live scheduler
                return True
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("redis unavailable (%s) at start; retrying in %.1f s", type(exc).__name__, self.interval)
                time.sleep(self.interval)
        return False

    def leave(self) -> None:
        """Release the locks and leave RQ's scheduler registries; with Redis away they expire by themselves."""
        try:
            self.retries.stop()
            self.delayed.register_death()
            with contextlib.suppress(SchedulerNotFound):  # its registry entry was cleaned up meanwhile
                self.periodic.register_death()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("redis unavailable (%s) while stopping; its locks expire by themselves", type(exc).__name__)

    def stop(self, *_: object) -> None:
        self.stopping = True


def main() -> None:
    settings = settings_or_exit()
    setup_logging_from(settings)
    connection = connections.settings_client(settings)
    periodic = periodic_scheduler(connection, settings, cron.PERIODIC_JOBS.values())
    loop = SchedulerLoop(connection, settings, periodic)
    signal.signal(signal.SIGTERM, loop.stop)
    signal.signal(signal.SIGINT, loop.stop)
    log.info(
        "scheduler started: delayed jobs, retry delays and %d periodic jobs, every %.1f s",
        len(cron.PERIODIC_JOBS),
        loop.interval,
    )
    loop.run()


if __name__ == "__main__":
    main()
