"""Proof, run with RQ's tests, that RQ's names give the project's classes and that their code runs.

Only in `scripts/rq-upstream.sh`: it uses the private Redis on 127.0.0.1:6379 inside that script's
network namespace, database 3 (RQ's tests take 4 to 16), and empties that database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import rq
import rq.worker
from redis import Redis
from rq.job import JobStatus
from rq.utils import import_attribute

from rq_upstream import adapter
from rq_upstream.plugin import stand_ins

CANARY_DB = 3


def noop() -> str:
    return "done"


@pytest.fixture
def connection() -> Iterator[Redis]:
    connection = Redis(db=CANARY_DB)
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


def test_rq_names_are_the_project_classes() -> None:
    classes = stand_ins()
    assert rq.Worker is rq.worker.Worker is classes["Worker"] is adapter.WORKER
    assert rq.SimpleWorker is rq.worker.SimpleWorker is classes["SimpleWorker"]
    assert rq.Queue is classes["Queue"] is adapter.QUEUE


def test_rq_command_line_is_told_the_project_classes() -> None:
    """`rq worker`, which some of RQ's tests start, reads its classes from these settings of its own."""
    assert import_attribute(os.environ["RQ_WORKER_CLASS"]) is adapter.WORKER
    assert import_attribute(os.environ["RQ_QUEUE_CLASS"]) is adapter.QUEUE


def test_a_queue_pop_is_our_claim(connection: Redis) -> None:
    """`Queue.dequeue_any` of RQ's name is the project's Lua pop, which records a claim."""
    queue = rq.Queue("canary", connection=connection)
    job = queue.enqueue(noop)
    popped = rq.Queue.dequeue_any([queue], None, connection=connection)
    assert popped is not None and popped[0].id == job.id
    assert connection.zscore(adapter.CLAIMS_KEY, job.id) is not None


def test_a_simple_worker_runs_our_code(connection: Redis) -> None:
    """The project's simple worker counts the jobs it ran (for its recycling); RQ's has no such count."""
    queue = rq.Queue("canary", connection=connection)
    job = queue.enqueue(noop)
    worker = rq.SimpleWorker([queue], connection=connection)
    assert worker.work(burst=True)
    assert job.get_status() == JobStatus.FINISHED
    assert getattr(worker, "jobs_run", None) == 1
    assert connection.zcard(adapter.CLAIMS_KEY) == 0


def test_a_forking_worker_gives_our_heartbeat_ttl(connection: Redis) -> None:
    """The project's forking worker lets a job's heartbeat expire `heartbeat_grace` s late; RQ's 60 s."""
    queue = rq.Queue("canary", connection=connection)
    job = queue.enqueue(noop, job_timeout=600)
    worker = rq.Worker([queue], connection=connection, job_monitoring_interval=7)
    assert worker.get_heartbeat_ttl(job) == 7 + adapter.WORKER.heartbeat_grace != 7 + 60
    assert worker.work(burst=True)
    assert job.get_status() == JobStatus.FINISHED
