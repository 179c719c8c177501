"""Where the job service's jobs are: the process's Redis, its priority queues, one job by id, and how
writes are made (one transaction; answered only once replicated, `accepting`).

Every other module of `herald.jobs` reaches Redis through `get_redis` (tests replace it here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar, cast

from redis import Redis
from redis.client import Pipeline
from rq import Queue
from rq.job import Job

from herald.exceptions import JobNotFoundError
from herald.infra import connections, keys
from herald.rq_seam import dates
from settings import QUEUE_NAMES, Settings

dates.install()  # RQ's job timestamps read without `strptime` (herald/rq_seam/dates.py)

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


def fetch_job(settings: Settings, job_id: str) -> Job:
    job = Job.fetch_many([job_id], connection=get_redis(settings))[0]
    if job is None:
        raise JobNotFoundError(job_id)
    return job
