"""The callbacks RQ runs when a job ends, and the options (timeouts, TTLs, retries, those callbacks)
every job of the service is created with.

This module keeps its name, and is the callbacks' home, because RQ stores a callback by dotted path in
each job's hash (`herald.jobs.queues.on_job_failure`, `herald.jobs.queues.on_job_success`) and imports
it by that path when the job ends: jobs already in Redis, jobs written by older releases (the older
`queues.on_job_*`, served from here by `herald.rq_seam.legacy_paths`), and jobs that a worker of an
earlier release still running beside this one picks up. Moving them would break those jobs.
The rest of the job service is in `store`, `backpressure`, `retries`, `enqueue`, `states` and `views`.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import Callback, Retry
from rq.job import Job

from herald.exceptions import PermanentError
from herald.infra import metrics
from settings import Settings


def on_job_failure(job: Job, connection: Redis, exc_type: type, exc_value: BaseException, tb: Any) -> None:
    """RQ failure callback, run before RQ decides to retry: keep the error, stop retries if permanent."""
    job.meta["error"] = {"type": exc_type.__name__, "message": str(exc_value)}
    job.save_meta()
    if isinstance(exc_value, PermanentError):
        job.retries_left = 0
    metrics.job_ended(job, connection, "retried" if job.should_retry else "failed")


def on_job_success(job: Job, connection: Redis, result: Any) -> None:
    """RQ success callback: count the job and its timings."""
    metrics.job_ended(job, connection, "finished")


def job_options(settings: Settings, retry: Retry | None) -> dict[str, Any]:
    """Timeouts, TTLs, retries and the callbacks (errors, metrics) that every job of the service gets."""
    return {
        "timeout": settings.job_timeout_seconds,
        "result_ttl": settings.result_ttl_seconds,
        "failure_ttl": settings.failure_ttl_seconds,
        "retry": retry,
        "on_failure": Callback(on_job_failure),
        "on_success": Callback(on_job_success),
    }
