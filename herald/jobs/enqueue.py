"""Putting work on the queues: a registered task (blocking, or on the event loop), a batch of emails,
and the steps other producers share (`submit` a created job, `park` one that waits).

Every job is created with `queues.job_options` and checked against `backpressure` first.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from datetime import datetime
from typing import Any
from uuid import uuid4

from pydantic import BaseModel
from redis.client import Pipeline
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import DeferredJobRegistry
from rq.utils import get_call_string

from herald.exceptions import ServiceError, UnknownTaskError
from herald.infra import connections, metrics
from herald.jobs import backpressure, queues, retries, store
from herald.rq_seam import enqueue as rq_enqueue
from herald.rq_seam import limits, replay
from herald.schemas import Priority
from settings import Settings
from tasks import TASKS, Task


@store.accepting
def enqueue_task(
    settings: Settings, name: str, kwargs: dict[str, Any], priority: Priority = "default", due: datetime | None = None
) -> Job:
    """Validate a registered task's arguments and queue it, or hand it to rq-scheduler when `due`.

    A task that waits (`Task.waits`) is parked instead, until `states.complete_job`.
    Raises `UnknownTaskError`, or pydantic's `ValidationError` for bad arguments.
    """
    task, arguments, queue = _checked(settings, name, kwargs, priority, due)
    backpressure.ensure_capacity(settings, queue)
    job = _created(settings, queue, task, name, arguments)
    with store.transaction(settings) as pipeline:
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
    await backpressure.ensure_capacity_async(settings, queue)
    if not rq_enqueue.knows_server_version(queue.connection):
        await asyncio.to_thread(queue.get_redis_server_version)
    job = _created(settings, queue, task, name, arguments)
    recorder = store.get_redis(settings).pipeline()  # never executed: RQ writes its commands here, for the replay
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
    return task, arguments, store.get_queue(priority, store.get_redis(settings))


def _created(settings: Settings, queue: Queue, task: Task, name: str, arguments: dict[str, Any]) -> Job:
    options = queues.job_options(settings, retries.retry_policy(settings))
    rate_limit = limits.for_smtp(settings) if name == "send_email" else None
    return queue.create_job(task.func, kwargs=arguments, meta={"task": name}, rate_limit=rate_limit, **options)


def _write(
    queue: Queue, job: Job, task: Task, due: datetime | None, pipeline: Pipeline, recorded: bool = False
) -> None:
    if task.waits:
        park(queue, job, pipeline)
    else:
        submit(queue, job, due, pipeline, recorded)


@store.accepting
def enqueue_emails(settings: Settings, messages: list[dict[str, Any]], priority: Priority) -> dict[str, JobStatus]:
    """Queue many already-validated emails at once: one capacity check, one transaction; their ids and
    statuses, in order (`rate_limited` for those waiting for a slot of the SMTP server's).

    RQ's objects take about 115 µs to build and write each job here. A batch is written as RQ would
    write it, from one job that RQ builds: each job's hash is a COPY of that job's hash with its own
    arguments, description and backoff jitter set over it (so a batch that fails together does not
    retry together); then one RPUSH of every id. `tests/test_api.py` checks the hashes field by field
    against RQ's own. COPY needs Redis 6.2; before it, each hash is written whole.
    """
    queue = store.get_queue(priority, store.get_redis(settings))
    backpressure.ensure_capacity(settings, queue)
    model = _created(settings, queue, TASKS["send_email"], "send_email", messages[0])
    rq_enqueue.prepare_for_queue(queue, model)
    if model.has_rate_limit:
        rq_enqueue.mark_rate_limited(model)  # each waits for its slot: `limits.submit_many`
    ids, copy = [str(uuid4()) for _ in messages], queue.get_redis_server_version() >= (6, 2, 0)
    with store.get_redis(settings).pipeline() as pipeline:  # a `transaction` whose replies say which jobs got a slot
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
    backpressure.count_own_enqueue(queue.name, len(ids))
    promoted = limits.promoted(replies[-1]) if model.has_rate_limit else set(ids)
    return {job_id: JobStatus.QUEUED if job_id in promoted else JobStatus.RATE_LIMITED for job_id in ids}


def _own_fields(model: Job, kwargs: dict[str, Any], settings: Settings) -> dict[Any, Any]:
    """The fields of a job made like `model` that differ with its arguments, and its jitter."""
    own: dict[Any, Any] = {}
    own["data"] = zlib.compress(model.serializer.dumps((model.func_name, None, (), kwargs)))
    own["description"] = str(get_call_string(model.func_name, (), kwargs, max_length=75))
    if model.retry_intervals is not None:
        own["retry_intervals"] = json.dumps(retries.backoff_intervals(settings, retries=len(model.retry_intervals)))
    return own


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
        backpressure.count_own_enqueue(queue.name)
        return
    if due is None:
        queue.enqueue_job(job, pipeline=pipeline)
        backpressure.count_own_enqueue(queue.name)
        return
    job.set_status(JobStatus.SCHEDULED, pipeline=pipeline)
    job.save(pipeline=pipeline)
    pipeline.zadd(store.DELAYED_JOBS_KEY, {job.id: due.timestamp()})


def park(queue: Queue, job: Job, pipeline: Pipeline) -> None:
    """Add a created job that waits for a person or outside system: deferred, in the queue's deferred
    registry (as RQ keeps a job waiting on a dependency, of which it has none), never on the queue.

    No worker runs it; `states.complete_job` finishes it with a result, and `states.cancel_job` cancels it.
    """
    job.set_status(JobStatus.DEFERRED, pipeline=pipeline)
    job.save(pipeline=pipeline)
    DeferredJobRegistry(queue.name, connection=queue.connection).add(job, pipeline=pipeline)
