"""Redis connection, the priority queues, the retry policy, and every job operation.

Shared by the API and the workers; it never imports the web layer.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, cast

from redis import Redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.retry import Retry as RedisRetry
from rq import Callback, Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry
from rq.results import Result

from exceptions import JobNotFoundError, JobStateError, PermanentError, UnknownTaskError
from schemas import JobError, JobView, Priority
from settings import QUEUE_NAMES, Settings, get_settings
from tasks import TASKS

CANCELABLE = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}
DELAYED_JOBS_KEY = "rq:scheduler:scheduled_jobs"
"""rq-scheduler's sorted set of delayed jobs, scored by due time (Unix seconds, kept with fractions)."""


@lru_cache(maxsize=8)
def _connection(url: str, socket_timeout: float) -> Redis:
    return Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=RedisRetry(NoBackoff(), 1),  # one quick reconnect after a Redis restart, no more
        health_check_interval=30,
    )


def get_redis(settings: Settings | None = None) -> Redis:
    """The process's Redis client; its timeouts bound how long a request can wait for Redis."""
    settings = settings or get_settings()
    return _connection(settings.redis_url, settings.redis_socket_timeout)


def get_queue(name: str, connection: Redis | None = None) -> Queue:
    if name not in QUEUE_NAMES:
        raise ValueError(f"unknown queue {name!r}")
    return Queue(name, connection=connection or get_redis())


def backoff_intervals(settings: Settings, rng: random.Random | None = None, retries: int | None = None) -> list[int]:
    """Exponential backoff with jitter: `min(base * 2**n, cap)`, plus up to `jitter` of it.

    RQ only takes a list of delays, so the list is computed here, once per job.
    """
    rng = rng or random.Random()
    delays = []
    for attempt in range(settings.retry_max if retries is None else retries):
        delay = min(settings.retry_base_seconds * 2**attempt, settings.retry_cap_seconds)
        delays.append(round(delay * (1 + rng.uniform(0, settings.retry_jitter))))
    return delays


def retry_policy(settings: Settings, retries: int | None = None) -> Retry | None:
    """RQ's `Retry` with our backoff; `retries` defaults to `RETRY_MAX`. None when no retries."""
    retries = settings.retry_max if retries is None else retries
    return Retry(max=retries, interval=backoff_intervals(settings, retries=retries)) if retries else None


def on_job_failure(job: Job, connection: Redis, exc_type: type, exc_value: BaseException, tb: Any) -> None:
    """RQ failure callback, run before RQ decides to retry: keep the error, stop retries if permanent."""
    job.meta["error"] = {"type": exc_type.__name__, "message": str(exc_value)}
    job.save_meta()
    if isinstance(exc_value, PermanentError):
        job.retries_left = 0


def enqueue_task(name: str, kwargs: dict[str, Any], priority: Priority = "default", due: datetime | None = None) -> Job:
    """Validate a registered task's arguments and queue it, or hand it to rq-scheduler when `due`.

    Raises `UnknownTaskError`, or pydantic's `ValidationError` for bad arguments.
    """
    task = TASKS.get(name)
    if task is None:
        raise UnknownTaskError(name, sorted(TASKS))
    arguments = task.args.model_validate(kwargs).model_dump(mode="json")
    queue = get_queue(priority)
    job = queue.create_job(
        task.func, kwargs=arguments, meta={"task": name}, **job_options(retry_policy(get_settings()))
    )
    with transaction() as pipeline:
        submit(queue, job, due, pipeline)
    return job


@contextmanager
def transaction() -> Iterator[Pipeline]:
    """A MULTI/EXEC pipeline, executed on leaving the block.

    MULTI is started explicitly: RQ's `enqueue_job` would start it itself, which fails once other
    commands are queued before it.
    """
    with get_redis().pipeline() as pipeline:
        pipeline.multi()
        yield pipeline
        pipeline.execute()


def job_options(retry: Retry | None) -> dict[str, Any]:
    """Timeouts, TTLs, retries and the failure callback that every job of the service gets."""
    settings = get_settings()
    return {
        "timeout": settings.job_timeout_seconds,
        "result_ttl": settings.result_ttl_seconds,
        "failure_ttl": settings.failure_ttl_seconds,
        "retry": retry,
        "on_failure": Callback(on_job_failure),
    }


def submit(queue: Queue, job: Job, due: datetime | None, pipeline: Pipeline) -> None:
    """Add a created job to `pipeline`: onto its queue now, or to rq-scheduler's set when `due`.

    rq-scheduler's own `enqueue_at` would drop the job's `Retry`, so the job is written here, and the
    caller's transaction makes the job and its place in the queue or schedule appear together.
    """
    if due is None:
        queue.enqueue_job(job, pipeline=pipeline)
        return
    job.set_status(JobStatus.SCHEDULED, pipeline=pipeline)
    job.save(pipeline=pipeline)
    pipeline.zadd(DELAYED_JOBS_KEY, {job.id: due.timestamp()})


def fetch_job(job_id: str) -> Job:
    job = Job.fetch_many([job_id], connection=get_redis())[0]
    if job is None:
        raise JobNotFoundError(job_id)
    return job


def cancel_job(job_id: str) -> Job:
    """Cancel a job that has not started; a job that ran (or runs) cannot be canceled."""
    job = fetch_job(job_id)
    job.connection.zrem(DELAYED_JOBS_KEY, job.id)  # first, so rq-scheduler cannot move it any more
    status = job.get_status()
    if status not in CANCELABLE:
        raise JobStateError(f"job {job_id} is {status.value}; only queued or scheduled jobs can be canceled")
    job.cancel()
    return job


def requeue_job(job_id: str) -> Job:
    """Put a failed job back on its queue, with its retries restored."""
    job = fetch_job(job_id)
    if job.get_status() != JobStatus.FAILED:
        raise JobStateError(f"job {job_id} is {job.get_status().value}; only failed jobs can be requeued")
    job.retries_left = len(job.retry_intervals) if job.retry_intervals else None
    job.meta.pop("error", None)
    return FailedJobRegistry(job.origin, connection=job.connection).requeue(job)


def failed_jobs(queue: Priority | None, offset: int, limit: int) -> tuple[int, list[Job]]:
    """Failed jobs, newest first, across one queue or all of them."""
    keys = [FailedJobRegistry(name, connection=get_redis()).key for name in ([queue] if queue else QUEUE_NAMES)]
    total, page = _merged_page(keys, offset, limit, newest_first=True)
    return total, _fetch_existing([job_id for job_id, _ in page])


def scheduled_jobs(offset: int, limit: int) -> tuple[int, list[Job]]:
    """Jobs waiting for their time, soonest first: delayed ones (rq-scheduler) and retries (RQ)."""
    keys = [DELAYED_JOBS_KEY, *(ScheduledJobRegistry(name, connection=get_redis()).key for name in QUEUE_NAMES)]
    total, page = _merged_page(keys, offset, limit, newest_first=False)
    return total, _fetch_existing([job_id for job_id, _ in page])


def _merged_page(keys: list[str], offset: int, limit: int, newest_first: bool) -> tuple[int, list[tuple[str, float]]]:
    """One page of several sorted sets merged by score, reading no more than the page needs from each."""
    with get_redis().pipeline(transaction=False) as pipeline:
        for key in keys:
            pipeline.zcard(key)
            read = pipeline.zrevrange if newest_first else pipeline.zrange
            read(key, 0, offset + limit - 1, withscores=True)
        replies = pipeline.execute()
    total = sum(replies[0::2])
    entries = [(job_id.decode(), score) for reply in replies[1::2] for job_id, score in reply]
    entries.sort(key=lambda entry: cast(float, entry[1]), reverse=newest_first)
    return total, entries[offset : offset + limit]


def _fetch_existing(job_ids: list[str]) -> list[Job]:
    return [job for job in Job.fetch_many(job_ids, connection=get_redis()) if job is not None]


def scheduled_for(job: Job) -> datetime | None:
    """When a scheduled job is due: from rq-scheduler's set, else from RQ's retry registry."""
    score = job.connection.zscore(DELAYED_JOBS_KEY, job.id)
    if score is None:
        score = job.connection.zscore(ScheduledJobRegistry(job.origin, connection=job.connection).key, job.id)
    return datetime.fromtimestamp(score, UTC) if score is not None else None


def job_view(job: Job) -> JobView:
    status = job.get_status(refresh=False)
    return JobView(
        id=job.id,
        task=job.meta.get("task", job.func_name),
        status=status.value if status else "unknown",
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
