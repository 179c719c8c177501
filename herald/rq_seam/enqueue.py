"""RQ's private steps of an enqueue, for the service's own ways of writing jobs (`herald.jobs.enqueue`)."""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus


def knows_server_version(connection: Redis) -> bool:
    """Whether RQ has cached the server's version on this client (`Queue.get_redis_server_version`
    keeps INFO's answer as an attribute of the client, so it asks once per client)."""
    return bool(getattr(connection, "__rq_redis_server_version", None))


def prepare_for_queue(queue: Queue, job: Job) -> None:
    """What RQ's `enqueue_job` sets on a job before saving it: origin, enqueued_at, status."""
    queue._prepare_for_queue(job)


def mark_rate_limited(job: Job) -> None:
    """Set the job's status in memory only, as RQ does before a rate-limited job is saved."""
    job._status = JobStatus.RATE_LIMITED
