"""rq-scheduler's and RQ's cron scheduler, each changed where the service needs it, and the run-time
arithmetic of RQ's cron jobs they use."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.cron import CronJob, CronScheduler
from rq.utils import now
from rq_scheduler import Scheduler

from herald.infra import keys

log = logging.getLogger("scheduler")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class DelayedJobScheduler(Scheduler):  # type: ignore[misc]
    """rq-scheduler, comparing due times to the fraction of a second: a job never starts early."""

    def get_jobs_to_queue(self, with_times: bool = False) -> Any:
        return self.get_jobs(time.time(), with_times=with_times)


class ExactlyOnceCronScheduler(CronScheduler):
    """RQ's cron scheduler (written for rq 3.0.0), changed in one method: `enqueue_jobs`.

    RQ's own enqueues every job that is due in this process, so two processes enqueue each run twice.
    Here a job that is due first claims its run in Redis, `SET NX EX` on a key named by the job and the
    time the run was due, and only the process that set the key enqueues; the others step on to the
    next run. Other changes follow from it: a job that fell behind (Redis away) runs once, for its
    latest due time, not once per missed time; and interval runs fall on the interval's grid since the
    epoch (`last_interval_run`) rather than counting from each process's start. RQ's
    `latest_enqueue_time` of a job holds the due time of its last run, not the time it was enqueued.
    The key is set just before the enqueue and deleted if the enqueue fails: a process killed between
    the two loses that one run (at most once, never twice).
    """

    def enqueue_jobs(self) -> list[CronJob]:
        current, enqueued = now(), list[CronJob]()
        for job in self.get_jobs():
            if job.should_run():
                due = latest_due(job, current)
                if self.claim_run(job, due):
                    self.enqueue_run(job, due)
                    enqueued.append(job)
                job.set_enqueue_time(due)
        return enqueued

    def claim_run(self, job: CronJob, due: datetime) -> bool:
        """Whether this process is the one to enqueue `job`'s run due at `due`."""
        period = (next_run_after(job.cron, job.interval, due) - due).total_seconds()
        expiry = math.ceil(2 * period) + 60  # outlives the run's turn in every process, clock skew too
        return bool(self.connection.set(run_key(job.name, due), self.name, nx=True, ex=expiry))

    def enqueue_run(self, job: CronJob, due: datetime) -> None:
        """RQ's enqueue (the job, its cron history), with the due time in the job's meta as `run_at`."""
        job.job_options["meta"] = {**job.job_options.get("meta", {}), "run_at": due.isoformat()}
        try:
            job.enqueue(self.connection)
        except Exception:
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                self.connection.delete(run_key(job.name, due))  # so that another process may enqueue it
            raise
        log.info("periodic job enqueued", extra={"periodic_job": job.name, "run_at": due.isoformat()})


def run_key(name: str, due: datetime) -> str:
    """The key that claims the run of periodic job `name` due at `due`."""
    return keys.periodic_run(name, due.isoformat())


def next_run_after(cron: str | None, interval: int | None, after: datetime) -> datetime:
    """The first run time strictly after `after`: RQ's own cron arithmetic, or the interval's grid."""
    if interval:
        return last_interval_run(interval, after) + timedelta(seconds=interval)
    probe = CronJob(queue_name="default", func_name="herald.rq_seam.schedulers.next_run_after", cron=cron)
    probe.latest_enqueue_time = after
    return probe.get_next_enqueue_time()


def last_interval_run(interval: int, at: datetime) -> datetime:
    """The latest run time of an interval job at or before `at`: a multiple of `interval` since the epoch."""
    elapsed = int((at - EPOCH).total_seconds())
    return EPOCH + timedelta(seconds=elapsed - elapsed % interval)


def latest_due(job: CronJob, current: datetime) -> datetime:
    """The latest run time of `job` at or before `current` (a job that fell behind skips to it).

    Every process that handles the run computes the same time, whatever its own tick or start time.
    """
    if job.interval:
        return last_interval_run(job.interval, current)
    due = job.next_enqueue_time or current
    while (following := next_run_after(job.cron, None, due)) <= current:
        due = following
    return due
