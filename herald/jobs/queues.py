"""Redis connection, the priority queues, the retry policy, and every job operation.

Shared by the API and the workers; it never imports the web layer. Operations take the settings of
the process (the app's, the worker's) as their first argument.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar, cast
from uuid import uuid4

from pydantic import BaseModel
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq import Callback, Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import DeferredJobRegistry, FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry
from rq.results import Result
from rq.utils import get_call_string

from herald.exceptions import (
    JobNotFoundError,
    JobStateError,
    PermanentError,
    QueueFullError,
    ServiceError,
    UnknownTaskError,
)
from herald.infra import connections, keys, metrics, metrics_hooks
from herald.infra.statuses import JobState
from herald.rq_seam import enqueue, limits, replay
from herald.schemas import JobAccepted, JobError, JobView, Priority
from settings import QUEUE_NAMES, Settings
from tasks import TASKS, Task

CANCELABLE = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.RATE_LIMITED}
DELAYED_JOBS_KEY = keys.DELAYED_JOBS
"""rq-scheduler's sorted set of delayed jobs, scored by due time (Unix seconds, kept with fractions)."""


def get_redis(settings: Settings) -> Redis:
    """The process's Redis client; its timeouts bound how long a request can wait for Redis.

    Within an `accepting` operation, the one connection whose writes that operation waits for.
    """
    return connections.redis_client(settings)


F = TypeVar("F", bound=Callable[..., Any])


def replicated(settings: Settings) -> AbstractContextManager[None]:
    """The block's writes are answered as accepted only once `REDIS_WAIT_REPLICAS` replicas have them
    (`connections.replicated_writes`); with 0 (the default), a plain block."""
    return connections.replicated_writes(settings)


def accepting(operation: F) -> F:
    """An operation that accepts work (its first argument the settings): its writes are `replicated`
    before it returns."""

    @functools.wraps(operation)
    def replicated_operation(settings: Settings, *args: Any, **kwargs: Any) -> Any:
        with replicated(settings):
            return operation(settings, *args, **kwargs)

    return cast(F, replicated_operation)


def get_queue(name: str, connection: Redis) -> Queue:
    if name not in QUEUE_NAMES:
        raise ValueError(f"unknown queue {name!r}")
    return Queue(name, connection=connection)


_known_lengths: dict[str, tuple[float, int]] = {}
"""Queue name -> (monotonic time read, length): this process's last look at each queue."""
LENGTH_FRESH_SECONDS = 0.5


def ensure_capacity(settings: Settings, queue: Queue) -> None:
    """Backpressure: refuse new work once `queue` holds `QUEUE_MAX_WAITING` waiting jobs, counting those
    waiting for a destination slot (`limits.waiting`).

    The length (one script) is read again only when the last look is older than half a second or was
    within a tenth of the limit, so a busy API skips that round trip while the queue is far from full.
    """
    if _length_is_stale(settings, queue.name):
        _known_lengths[queue.name] = (time.monotonic(), limits.waiting(queue))
    if _is_full(settings, queue.name):
        metrics_hooks.record_rejection(queue.connection, queue.name)
        raise _queue_full(settings, queue.name)


async def ensure_capacity_async(settings: Settings, queue: Queue) -> None:
    """`ensure_capacity` through the asyncio client."""
    if _length_is_stale(settings, queue.name):
        waiting = await limits.waiting_async(connections.async_redis_client(settings), queue)
        _known_lengths[queue.name] = (time.monotonic(), waiting)
    if _is_full(settings, queue.name):
        await asyncio.to_thread(metrics_hooks.record_rejection, queue.connection, queue.name)
        raise _queue_full(settings, queue.name)


def _length_is_stale(settings: Settings, queue_name: str) -> bool:
    read_at, waiting = _known_lengths.get(queue_name, (0.0, 0))
    near_limit = waiting >= settings.queue_max_waiting * 0.9
    return near_limit or time.monotonic() - read_at > LENGTH_FRESH_SECONDS


def _is_full(settings: Settings, queue_name: str) -> bool:
    return _known_lengths[queue_name][1] >= settings.queue_max_waiting


def _queue_full(settings: Settings, queue_name: str) -> QueueFullError:
    return QueueFullError(queue_name, _known_lengths[queue_name][1], settings.queue_full_retry_after_seconds)


def _count_own_enqueue(queue_name: str, count: int = 1) -> None:
    """Keep this process's last look at the queue's length up to date with what it adds itself."""
    if queue_name in _known_lengths:
        read_at, waiting = _known_lengths[queue_name]
        _known_lengths[queue_name] = (read_at, waiting + count)


_JITTER = random.Random()
"""The jitter's source (a new `random.Random()` per job would read the OS's entropy pool each time)."""


def backoff_intervals(settings: Settings, rng: random.Random | None = None, retries: int | None = None) -> list[int]:
    """Exponential backoff with jitter: `min(base * 2**n, cap)`, plus up to `jitter` of it.

    RQ only takes a list of delays, so the list is computed here, once per job.
    """
    rng = rng or _JITTER
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
    metrics.job_ended(job, connection, "retried" if job.should_retry else "failed")


def on_job_success(job: Job, connection: Redis, result: Any) -> None:
    """RQ success callback: count the job and its timings."""
    metrics.job_ended(job, connection, "finished")


@accepting
def enqueue_task(
    settings: Settings, name: str, kwargs: dict[str, Any], priority: Priority = "default", due: datetime | None = None
) -> Job:
    """Validate a registered task's arguments and queue it, or hand it to rq-scheduler when `due`.

    A task that waits (`Task.waits`) is parked instead, until `complete_job`.
    Raises `UnknownTaskError`, or pydantic's `ValidationError` for bad arguments.
    """
    task, arguments, queue = _checked(settings, name, kwargs, priority, due)
    ensure_capacity(settings, queue)
    job = _created(settings, queue, task, name, arguments)
    with transaction(settings) as pipeline:
        _write(queue, job, task, due, pipeline)
    if job.get_status(refresh=False) == JobStatus.RATE_LIMITED:
        job.get_status(refresh=True)  # promoted in the transaction if its key had a free slot
    return job


async def enqueue_task_async(
    settings: Settings,
    name: str,
    kwargs: dict[str, Any] | BaseModel,
    priority: Priority = "default",
    due: datetime | None = None,
) -> Job:
    """`enqueue_task` for the API's event loop: the same job and the same commands, applied through the
    asyncio client in one atomic round trip (`replay.execute_async`), so no thread waits for Redis.

    `kwargs` may be an instance of the task's arguments model, already validated by the caller.
    """
    task, arguments, queue = _checked(settings, name, kwargs, priority, due)
    await ensure_capacity_async(settings, queue)
    if not enqueue.knows_server_version(queue.connection):
        await asyncio.to_thread(queue.get_redis_server_version)
    job = _created(settings, queue, task, name, arguments)
    recorder = get_redis(settings).pipeline()  # never executed: RQ writes its commands here, for the replay
    recorder.multi()
    _write(queue, job, task, due, recorder, recorded=True)
    client, replicas = (
        connections.async_redis_client(settings),
        (settings.redis_wait_replicas, settings.redis_wait_timeout_ms),
    )
    if job.get_status(refresh=False) == JobStatus.RATE_LIMITED:  # its slot asked for in the same script
        await limits.execute_async(client, recorder, job, *replicas)
    else:
        await replay.execute_async(client, recorder, *replicas)
    return job


def _checked(
    settings: Settings, name: str, kwargs: dict[str, Any] | BaseModel, priority: Priority, due: datetime | None
) -> tuple[Task, dict[str, Any], Queue]:
    """The task, its arguments as JSON values, and the queue; raises if any is wrong."""
    task = TASKS.get(name)
    if task is None:
        raise UnknownTaskError(name, sorted(TASKS))
    checked = kwargs if isinstance(kwargs, task.args) else task.args.model_validate(kwargs)
    arguments = checked.model_dump(mode="json", include=set(task.args.model_fields))
    if task.waits and due is not None:
        raise ServiceError(f"task {name!r} waits for complete_task; it takes no delay_seconds or send_at")
    return task, arguments, get_queue(priority, get_redis(settings))


def _created(settings: Settings, queue: Queue, task: Task, name: str, arguments: dict[str, Any]) -> Job:
    options = job_options(settings, retry_policy(settings))
    rate_limit = limits.for_smtp(settings) if name == "send_email" else None
    return queue.create_job(task.func, kwargs=arguments, meta={"task": name}, rate_limit=rate_limit, **options)


def _write(
    queue: Queue, job: Job, task: Task, due: datetime | None, pipeline: Pipeline, recorded: bool = False
) -> None:
    if task.waits:
        park(queue, job, pipeline)
    else:
        submit(queue, job, due, pipeline, recorded)


@accepting
def enqueue_emails(settings: Settings, messages: list[dict[str, Any]], priority: Priority) -> dict[str, JobStatus]:
    """Queue many already-validated emails at once: one capacity check, one transaction; their ids and
    statuses, in order (`rate_limited` for those waiting for a slot of the SMTP server's).

    RQ's objects take about 115 µs to build and write each job here. A batch is written as RQ would
    write it, from one job that RQ builds: each job's hash is a COPY of that job's hash with its own
    arguments, description and backoff jitter set over it (so a batch that fails together does not
    retry together); then one RPUSH of every id. `tests/test_api.py` checks the hashes field by field
    against RQ's own. COPY needs Redis 6.2; before it, each hash is written whole.
    """
    queue = get_queue(priority, get_redis(settings))
    ensure_capacity(settings, queue)
    model = _created(settings, queue, TASKS["send_email"], "send_email", messages[0])
    enqueue.prepare_for_queue(queue, model)
    if model.has_rate_limit:
        enqueue.mark_rate_limited(model)  # each waits for its slot: `limits.submit_many`
    ids, copy = [str(uuid4()) for _ in messages], queue.get_redis_server_version() >= (6, 2, 0)
    with get_redis(settings).pipeline() as pipeline:  # a `transaction` whose replies say which jobs got a slot
        pipeline.multi()
        template: dict[Any, Any] = model.to_dict()
        if copy:
            pipeline.hset(model.key, mapping=template)
        for job_id, message in zip(ids, messages, strict=True):
            if copy:
                pipeline.copy(model.key, model.key_for(job_id))
            own = _own_fields(model, message, settings)
            pipeline.hset(model.key_for(job_id), mapping=own if copy else {**template, **own})
        pipeline.delete(model.key)
        pipeline.sadd(queue.redis_queues_keys, queue.key)
        metrics.jobs_submitted(pipeline, "send_email", len(ids))
        if model.has_rate_limit:
            limits.submit_many(queue, model, ids, pipeline)  # last: its reply, the jobs promoted
        else:
            pipeline.rpush(queue.key, *ids)
        replies = pipeline.execute()
    _count_own_enqueue(queue.name, len(ids))
    promoted = limits.promoted(replies[-1]) if model.has_rate_limit else set(ids)
    return {job_id: JobStatus.QUEUED if job_id in promoted else JobStatus.RATE_LIMITED for job_id in ids}


def _own_fields(model: Job, kwargs: dict[str, Any], settings: Settings) -> dict[Any, Any]:
    """The fields of a job made like `model` that differ with its arguments, and its jitter."""
    own: dict[Any, Any] = {}
    own["data"] = zlib.compress(model.serializer.dumps((model.func_name, None, (), kwargs)))
    own["description"] = str(get_call_string(model.func_name, (), kwargs, max_length=75))
    if model.retry_intervals is not None:
        own["retry_intervals"] = json.dumps(backoff_intervals(settings, retries=len(model.retry_intervals)))
    return own


@contextmanager
def transaction(settings: Settings) -> Iterator[Pipeline]:
    """A MULTI/EXEC pipeline, executed on leaving the block.

    MULTI is started explicitly: RQ's `enqueue_job` would start it itself, which fails once other
    commands are queued before it.
    """
    with get_redis(settings).pipeline() as pipeline:
        pipeline.multi()
        yield pipeline
        pipeline.execute()


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


def submit(queue: Queue, job: Job, due: datetime | None, pipeline: Pipeline, recorded: bool = False) -> None:
    """Add a created job to `pipeline`: onto its queue now, or to rq-scheduler's set when `due`.

    rq-scheduler's own `enqueue_at` would drop the job's `Retry`, so the job is written here, and the
    caller's transaction makes the job and its place in the queue or schedule appear together.
    A job with a per-destination limit (`limits`) waits for its slot instead (`recorded`: `pipeline`
    is replayed by a script that asks for the slot too, `limits.execute_async`).
    """
    metrics.job_submitted(pipeline, job)
    if due is None and job.has_rate_limit:
        (limits.submit_recorded if recorded else limits.submit)(queue, job, pipeline)
        _count_own_enqueue(queue.name)
        return
    if due is None:
        queue.enqueue_job(job, pipeline=pipeline)
        _count_own_enqueue(queue.name)
        return
    job.set_status(JobStatus.SCHEDULED, pipeline=pipeline)
    job.save(pipeline=pipeline)
    pipeline.zadd(DELAYED_JOBS_KEY, {job.id: due.timestamp()})


def park(queue: Queue, job: Job, pipeline: Pipeline) -> None:
    """Add a created job that waits for a person or outside system: deferred, in the queue's deferred
    registry (as RQ keeps a job waiting on a dependency, of which it has none), never on the queue.

    No worker runs it; `complete_job` finishes it with a result, and `cancel_job` cancels it.
    """
    job.set_status(JobStatus.DEFERRED, pipeline=pipeline)
    job.save(pipeline=pipeline)
    DeferredJobRegistry(queue.name, connection=queue.connection).add(job, pipeline=pipeline)


def waits(job: Job) -> bool:
    """Whether the job is of a task that waits for `complete_job` (whatever its status now)."""
    task = TASKS.get(job.meta.get("task", ""))
    return task is not None and task.waits


def complete_job(settings: Settings, job_id: str, result: Any) -> Job:
    """Finish a waiting job (`Task.waits`) with `result` (JSON) as its return value, as a worker would.

    Any other job, or one no longer waiting (completed or canceled), is a `JobStateError`; running jobs
    are never touched. The status check and the change are one transaction (WATCH on the job's key).
    """
    job = fetch_job(settings, job_id)
    if not waits(job):
        task = job.meta.get("task", job.func_name)
        raise JobStateError(f"job {job_id} is a {task} job; only await_completion jobs can be completed")
    with get_redis(settings).pipeline() as pipeline:
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


def fetch_job(settings: Settings, job_id: str) -> Job:
    job = Job.fetch_many([job_id], connection=get_redis(settings))[0]
    if job is None:
        raise JobNotFoundError(job_id)
    return job


@accepting
def cancel_job(settings: Settings, job_id: str) -> Job:
    """Cancel a job that has not started; a job that ran (or runs) cannot be canceled."""
    job = fetch_job(settings, job_id)
    job.connection.zrem(DELAYED_JOBS_KEY, job.id)  # first, so rq-scheduler cannot move it any more
    status = job.get_status()
    if status not in CANCELABLE:
        raise JobStateError(f"job {job_id} is {status.value}; only queued or scheduled jobs can be canceled")
    job.cancel()
    return job


@accepting
def requeue_job(settings: Settings, job_id: str) -> Job:
    """Put a failed job back on its queue, with its retries restored."""
    job = fetch_job(settings, job_id)
    if job.get_status() != JobStatus.FAILED:
        raise JobStateError(f"job {job_id} is {job.get_status().value}; only failed jobs can be requeued")
    job.retries_left = len(job.retry_intervals) if job.retry_intervals else None
    job.meta.pop("error", None)
    return FailedJobRegistry(job.origin, connection=job.connection).requeue(job)


def failed_jobs(settings: Settings, queue: Priority | None, offset: int, limit: int) -> tuple[int, list[Job]]:
    """Failed jobs, newest first, across one queue or all of them."""
    connection = get_redis(settings)
    keys = [FailedJobRegistry(name, connection=connection).key for name in ([queue] if queue else QUEUE_NAMES)]
    total, page = _merged_page(connection, keys, offset, limit, newest_first=True)
    return total, _fetch_existing(connection, [job_id for job_id, _ in page])


def scheduled_jobs(settings: Settings, offset: int, limit: int) -> tuple[int, list[Job]]:
    """Jobs waiting for their time, soonest first: delayed ones (rq-scheduler) and retries (RQ)."""
    connection = get_redis(settings)
    keys = [DELAYED_JOBS_KEY, *(ScheduledJobRegistry(name, connection=connection).key for name in QUEUE_NAMES)]
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
    score = job.connection.zscore(DELAYED_JOBS_KEY, job.id)
    if score is None:
        score = job.connection.zscore(ScheduledJobRegistry(job.origin, connection=job.connection).key, job.id)
    return datetime.fromtimestamp(score, UTC) if score is not None else None


def status_name(job: Job, default: str = JobState.UNKNOWN) -> str:
    """RQ's status, but `waiting` for a parked job that waits for `complete_job` (RQ calls it deferred)."""
    status = job.get_status(refresh=False)
    if status == JobStatus.DEFERRED and waits(job):
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
