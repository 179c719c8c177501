"""Changes to a job's state asked for by a client: cancel one that has not started, requeue a failed
one, complete one that waits for a person or outside system (`Task.waits`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from redis.client import Pipeline
from redis.exceptions import WatchError
from rq.job import Job, JobStatus
from rq.registry import DeferredJobRegistry, FailedJobRegistry, FinishedJobRegistry
from rq.results import Result

from herald.exceptions import JobStateError
from herald.jobs import store
from settings import Settings
from tasks import TASKS

CANCELABLE = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.RATE_LIMITED}


def waits(job: Job) -> bool:
    """Whether the job is of a task that waits for `complete_job` (whatever its status now)."""
    task = TASKS.get(job.meta.get("task", ""))
    return task is not None and task.waits


def complete_job(settings: Settings, job_id: str, result: Any) -> Job:
    """Finish a waiting job (`Task.waits`) with `result` (JSON) as its return value, as a worker would.

    Any other job, or one no longer waiting (completed or canceled), is a `JobStateError`; running jobs
    are never touched. The status check and the change are one transaction (WATCH on the job's key).
    """
    job = store.fetch_job(settings, job_id)
    if not waits(job):
        task = job.meta.get("task", job.func_name)
        raise JobStateError(f"job {job_id} is a {task} job; only await_completion jobs can be completed")
    with store.get_redis(settings).pipeline() as pipeline:
        pipeline.watch(job.key)
        status = job.get_status()
        if status != JobStatus.DEFERRED:
            raise JobStateError(f"job {job_id} is {status.value}; only a waiting job can be completed")
        pipeline.multi()
        _finish(job, result, pipeline, settings.result_ttl_seconds)
        try:
            pipeline.execute()
        except WatchError:
            raise JobStateError(f"job {job_id} changed while being completed; fetch it again") from None
    return job


def _finish(job: Job, result: Any, pipeline: Pipeline, default_ttl: int) -> None:
    """What RQ's worker writes for a successful job: status, end time, result, finished registry, TTL."""
    ttl = job.get_result_ttl(default_ttl)
    job.ended_at = datetime.now(UTC)
    DeferredJobRegistry(job.origin, connection=job.connection).remove(job, pipeline=pipeline)
    job.set_status(JobStatus.FINISHED, pipeline=pipeline)
    job.save(pipeline=pipeline, include_meta=False)
    Result.create(job, Result.Type.SUCCESSFUL, ttl, return_value=result, pipeline=pipeline)
    FinishedJobRegistry(job.origin, connection=job.connection).add(job, ttl, pipeline=pipeline)
    job.cleanup(ttl, pipeline=pipeline, remove_from_queue=False)


@store.accepting
def cancel_job(settings: Settings, job_id: str) -> Job:
    """Cancel a job that has not started; a job that ran (or runs) cannot be canceled."""
    job = store.fetch_job(settings, job_id)
    job.connection.zrem(store.DELAYED_JOBS_KEY, job.id)  # first, so rq-scheduler cannot move it any more
    status = job.get_status()
    if status not in CANCELABLE:
        raise JobStateError(f"job {job_id} is {status.value}; only queued or scheduled jobs can be canceled")
    job.cancel()
    return job


@store.accepting
def requeue_job(settings: Settings, job_id: str) -> Job:
    """Put a failed job back on its queue, with its retries restored."""
    job = store.fetch_job(settings, job_id)
    if job.get_status() != JobStatus.FAILED:
        raise JobStateError(f"job {job_id} is {job.get_status().value}; only failed jobs can be requeued")
    job.retries_left = len(job.retry_intervals) if job.retry_intervals else None
    job.meta.pop("error", None)
    return FailedJobRegistry(job.origin, connection=job.connection).requeue(job)
