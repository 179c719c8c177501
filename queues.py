"""Redis connection, the priority queues, the retry policy, and every job operation.

Shared by the API and the workers; it never imports the web layer.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any, cast

from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq import Callback, Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.results import Result

from exceptions import JobNotFoundError, JobStateError, PermanentError, UnknownTaskError
from schemas import JobError, JobView, Priority
from settings import QUEUE_NAMES, Settings, get_settings
from tasks import TASKS

CANCELABLE = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}


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


def backoff_intervals(settings: Settings, rng: random.Random | None = None) -> list[int]:
    """Exponential backoff with jitter: `min(base * 2**n, cap)`, plus up to `jitter` of it.

    RQ only takes a list of delays, so the list is computed here, once per job.
    """
    rng = rng or random.Random()
    delays = []
    for attempt in range(settings.retry_max):
        delay = min(settings.retry_base_seconds * 2**attempt, settings.retry_cap_seconds)
        delays.append(round(delay * (1 + rng.uniform(0, settings.retry_jitter))))
    return delays


def retry_policy(settings: Settings) -> Retry | None:
    if settings.retry_max == 0:
        return None
    return Retry(max=settings.retry_max, interval=backoff_intervals(settings))


def on_job_failure(job: Job, connection: Redis, exc_type: type, exc_value: BaseException, tb: Any) -> None:
    """RQ failure callback, run before RQ decides to retry: keep the error, stop retries if permanent."""
    job.meta["error"] = {"type": exc_type.__name__, "message": str(exc_value)}
    job.save_meta()
    if isinstance(exc_value, PermanentError):
        job.retries_left = 0


def enqueue_task(name: str, kwargs: dict[str, Any], priority: Priority = "default") -> Job:
    """Validate a registered task's arguments and put it on the queue named by `priority`.

    Raises `UnknownTaskError`, or pydantic's `ValidationError` for bad arguments.
    """
    task = TASKS.get(name)
    if task is None:
        raise UnknownTaskError(name, sorted(TASKS))
    arguments = task.args.model_validate(kwargs).model_dump(mode="json")
    settings = get_settings()
    return get_queue(priority).enqueue_call(
        task.func,
        kwargs=arguments,
        timeout=settings.job_timeout_seconds,
        result_ttl=settings.result_ttl_seconds,
        failure_ttl=settings.failure_ttl_seconds,
        retry=retry_policy(settings),
        on_failure=Callback(on_job_failure),
        meta={"task": name},
    )


def fetch_job(job_id: str) -> Job:
    job = Job.fetch_many([job_id], connection=get_redis())[0]
    if job is None:
        raise JobNotFoundError(job_id)
    return job


def cancel_job(job_id: str) -> Job:
    """Cancel a job that has not started; a job that ran (or runs) cannot be canceled."""
    job = fetch_job(job_id)
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
    connection = get_redis()
    registries = [FailedJobRegistry(name, connection=connection) for name in ([queue] if queue else QUEUE_NAMES)]
    total = sum(registry.count for registry in registries)
    entries: list[tuple[float, str]] = []
    for registry in registries:
        newest = cast(
            list[tuple[bytes, float]], connection.zrevrange(registry.key, 0, offset + limit - 1, withscores=True)
        )
        entries.extend((score, job_id.decode()) for job_id, score in newest)
    entries.sort(reverse=True)
    page = [job_id for _, job_id in entries[offset : offset + limit]]
    return total, [job for job in Job.fetch_many(page, connection=connection) if job is not None]


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
