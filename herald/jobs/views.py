"""What the API shows of jobs: one job (`job_view`), the answer to a job just queued (`job_accepted`),
and pages of failed and scheduled jobs merged across the queues."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from redis import Redis
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry
from rq.results import Result

from herald.infra.statuses import JobState
from herald.jobs import states, store
from herald.schemas import JobAccepted, JobError, JobView, Priority
from settings import QUEUE_NAMES, Settings


def failed_jobs(settings: Settings, queue: Priority | None, offset: int, limit: int) -> tuple[int, list[Job]]:
    """Failed jobs, newest first, across one queue or all of them."""
    connection = store.get_redis(settings)
    keys = [FailedJobRegistry(name, connection=connection).key for name in ([queue] if queue else QUEUE_NAMES)]
    total, page = _merged_page(connection, keys, offset, limit, newest_first=True)
    return total, _fetch_existing(connection, [job_id for job_id, _ in page])


def scheduled_jobs(settings: Settings, offset: int, limit: int) -> tuple[int, list[Job]]:
    """Jobs waiting for their time, soonest first: delayed ones (rq-scheduler) and retries (RQ)."""
    connection = store.get_redis(settings)
    keys = [store.DELAYED_JOBS_KEY, *(ScheduledJobRegistry(name, connection=connection).key for name in QUEUE_NAMES)]
    total, page = _merged_page(connection, keys, offset, limit, newest_first=False)
    return total, _fetch_existing(connection, [job_id for job_id, _ in page])


def _merged_page(
    connection: Redis, keys: list[str], offset: int, limit: int, newest_first: bool
) -> tuple[int, list[tuple[str, float]]]:
    """One page of several sorted sets merged by score, reading no more than the page needs from each."""
    with connection.pipeline(transaction=False) as pipeline:
        for key in keys:
            pipeline.zcard(key)
            read = pipeline.zrevrange if newest_first else pipeline.zrange
            read(key, 0, offset + limit - 1, withscores=True)
        replies = pipeline.execute()
    total = sum(replies[0::2])
    entries = [(job_id.decode(), score) for reply in replies[1::2] for job_id, score in reply]
    entries.sort(key=lambda entry: cast(float, entry[1]), reverse=newest_first)
    return total, entries[offset : offset + limit]


def _fetch_existing(connection: Redis, job_ids: list[str]) -> list[Job]:
    return [job for job in Job.fetch_many(job_ids, connection=connection) if job is not None]


def scheduled_for(job: Job) -> datetime | None:
    """When a scheduled job is due: from rq-scheduler's set, else from RQ's retry registry."""
    score = job.connection.zscore(store.DELAYED_JOBS_KEY, job.id)
    if score is None:
        score = job.connection.zscore(ScheduledJobRegistry(job.origin, connection=job.connection).key, job.id)
    return datetime.fromtimestamp(score, UTC) if score is not None else None


def status_name(job: Job, default: str = JobState.UNKNOWN) -> str:
    """RQ's status, but `waiting` for a parked job that waits for `complete_job` (RQ calls it deferred)."""
    status = job.get_status(refresh=False)
    if status == JobStatus.DEFERRED and states.waits(job):
        return JobState.WAITING.value
    return status.value if status else str(default)


def job_accepted(job: Job) -> JobAccepted:
    """The answer to a job just created: where to follow it, and when it is due if it is scheduled."""
    status = job.get_status(refresh=False)
    return JobAccepted(
        job_id=job.id,
        status=status_name(job, default=JobStatus.QUEUED),
        queue=job.origin,
        status_url=f"/job/{job.id}",
        scheduled_for=scheduled_for(job) if status == JobStatus.SCHEDULED else None,
    )


def job_view(job: Job) -> JobView:
    status = job.get_status(refresh=False)
    return JobView(
        id=job.id,
        task=job.meta.get("task", job.func_name),
        status=status_name(job),
        queue=job.origin,
        created_at=job.created_at,
        enqueued_at=job.enqueued_at,
        started_at=job.started_at,
        ended_at=job.ended_at,
        retries_left=job.retries_left,
        scheduled_for=scheduled_for(job) if status == JobStatus.SCHEDULED else None,
        result=job.return_value() if status == JobStatus.FINISHED else None,
        error=_job_error(job) if status in (JobStatus.FAILED, JobStatus.SCHEDULED, JobStatus.QUEUED) else None,
    )


def _job_error(job: Job) -> JobError | None:
    """The last error: as the failure callback recorded it, else the traceback's last line."""
    if "error" in job.meta:
        return JobError(**job.meta["error"])
    result = job.latest_result()
    if result is None or result.type != Result.Type.FAILED or not result.exc_string:
        return None
    error_type, _, message = result.exc_string.strip().splitlines()[-1].partition(": ")
    return JobError(type=error_type.rpartition(".")[2], message=message)
