"""The periodic jobs: which registered task runs when, declared here and nowhere else.

`scheduler.py` runs them with RQ's cron scheduler; `GET /jobs/periodic` shows them. A job has a cron
expression (five fields, or six with seconds last, in the scheduler's local time as RQ reads them) or
an interval in seconds. Interval runs fall on multiples of the interval since the Unix epoch (a daily
interval runs at 00:00 UTC), so every scheduler process computes the same run times and each run can
be claimed once in Redis (`scheduler.ExactlyOnceCronScheduler`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from croniter import croniter
from redis import Redis
from rq.cron import CronScheduler, get_cron_job_ids
from rq.job import Job

from herald.infra.patterns import PERIODIC_JOB_NAME_PATTERN
from herald.infra.statuses import JobState
from herald.jobs import views
from herald.rq_seam.schedulers import last_interval_run as last_interval_run
from herald.rq_seam.schedulers import latest_due as latest_due
from herald.rq_seam.schedulers import next_run_after as next_run_after
from herald.schemas import PeriodicJobList, PeriodicJobView, PeriodicRun, Priority
from tasks import TASKS

NAME_PATTERN = re.compile(PERIODIC_JOB_NAME_PATTERN)


@dataclass(frozen=True)
class PeriodicJob:
    """A registered task with its arguments and priority, run on a cron expression or an interval."""

    name: str
    task: str
    cron: str | None = None
    interval: int | None = None
    """Seconds between runs."""
    args: Mapping[str, Any] = field(default_factory=dict)
    priority: Priority = "low"

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"periodic job name {self.name!r} must match {NAME_PATTERN.pattern}")
        if (self.cron is None) == (self.interval is None):
            raise ValueError(f"periodic job {self.name!r} needs a cron expression or an interval, not both")
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise ValueError(f"periodic job {self.name!r}: invalid cron expression {self.cron!r}")
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"periodic job {self.name!r}: interval must be at least 1 second")
        if self.task not in TASKS or TASKS[self.task].waits:
            raise ValueError(f"periodic job {self.name!r}: {self.task!r} is not a task a worker runs")
        object.__setattr__(self, "args", self.checked_args())

    def checked_args(self) -> dict[str, Any]:
        """The arguments, validated by the task's model, as JSON values (raises pydantic's ValidationError)."""
        model = TASKS[self.task].args
        return model.model_validate(dict(self.args)).model_dump(mode="json", include=set(model.model_fields))


PERIODIC_JOBS: dict[str, PeriodicJob] = {}
"""Name -> declaration: every periodic job there is."""


def register(job: PeriodicJob) -> PeriodicJob:
    if job.name in PERIODIC_JOBS:
        raise ValueError(f"periodic job {job.name!r} is declared twice")
    PERIODIC_JOBS[job.name] = job
    return job


register(PeriodicJob("purge_expired", task="purge_expired", cron="15 3 * * *", priority="low"))
"""Daily housekeeping at 03:15: inbox items past `INBOX_RETENTION_DAYS`."""


def periodic_jobs(connection: Redis) -> PeriodicJobList:
    """Each periodic job with its schedule, its last run and its next run; how many schedulers run them."""
    current = datetime.now(UTC)
    views = [_view(connection, job, current) for job in PERIODIC_JOBS.values()]
    return PeriodicJobList(schedulers=len(CronScheduler.all(connection)), jobs=views)


def _view(connection: Redis, job: PeriodicJob, current: datetime) -> PeriodicJobView:
    return PeriodicJobView(
        name=job.name,
        task=job.task,
        args=dict(job.args),
        priority=job.priority,
        cron=job.cron,
        interval_seconds=job.interval,
        last_run=_last_run(connection, job.name),
        next_run=next_run_after(job.cron, job.interval, current),
    )


def _last_run(connection: Redis, name: str) -> PeriodicRun | None:
    """The newest job RQ's cron history holds for `name`; its status `expired` once RQ deleted it."""
    job_ids = get_cron_job_ids(name, connection, 0, 0)
    if not job_ids:
        return None
    job = Job.fetch_many(job_ids, connection=connection)[0]
    if job is None:
        return PeriodicRun(job_id=job_ids[0], status=JobState.EXPIRED.value)
    run_at = job.meta.get("run_at")
    return PeriodicRun(
        job_id=job.id,
        status=views.status_name(job),
        run_at=datetime.fromisoformat(run_at) if run_at else None,
        enqueued_at=job.enqueued_at,
        ended_at=job.ended_at,
    )
