"""The "sent once" promise of the tasks that send (`tasks.send_email`, a delivery): a run that sent
records it, and a re-run of the same job (its worker died after sending, RQ ran it again) sends nothing.

A task-level marker under `keys.sent`, kept for the job's result TTL; it is not part of RQ's machinery.
"""

from __future__ import annotations

from redis.client import Pipeline
from rq.job import Job

from herald.infra import keys
from settings import Settings


def sent_marker(job: Job | None) -> str | None:
    """What an earlier run of `job` recorded after sending (a Message-ID), or None: not sent yet."""
    if job is None:
        return None
    value = job.connection.get(sent_key(job))
    return value.decode() if isinstance(value, bytes) else value


def mark_sent(settings: Settings, job: Job | None, value: str, pipeline: Pipeline | None = None) -> str:
    """Record that `job` has sent, so that a re-run after its worker died does not send again
    (on `pipeline` if given, which the caller sends).

    One duplicate stays possible: a worker killed after the server accepted and before this write.
    """
    if job is not None:
        (pipeline or job.connection).set(sent_key(job), value, ex=settings.result_ttl_seconds or 86_400)
    return value


def sent_key(job: Job) -> str:
    return keys.sent(job.id)
