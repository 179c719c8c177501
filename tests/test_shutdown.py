"""Stopping workers: SIGTERM lets the running job finish and takes no other; the job of a stock
`rq worker` that is killed is found by the scheduler's recovery sweep."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import cast

import pytest
from redis import Redis
from rq import Callback, Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from herald.jobs import queues, retries
from herald.rq_seam.recovery import CLAIMS_KEY
from settings import Settings
from tests import fixtures
from tests.conftest import StartProcess
from tests.helpers import kill_worker, wait_until


def _enqueue(redis: Redis, function: Callable[..., object], *args: object) -> Job:
    """A job with the service's retries and failure callback."""
    return Queue("default", connection=redis).enqueue(
        function, *args, retry=retries.retry_policy(Settings()), on_failure=Callback(queues.on_job_failure)
    )


def _runs(redis: Redis, job: Job) -> int:
    return int(redis.get(f"runs:{job.id}") or 0)


def _set(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("kind", ["simple", "fork"])
def test_a_sigtermed_worker_finishes_its_job_and_takes_no_other(
    kind: str, monkeypatch: pytest.MonkeyPatch, redis: Redis, processes: StartProcess
) -> None:
    """One job at a time (WORKER_THREADS=1): a threaded worker takes all four at once, and its warm
    shutdown (its running jobs finish, no claim is left) is in tests/test_threaded.py."""
    _set(monkeypatch, WORKER_CLASS=kind, WORKER_COUNT="1", WORKER_THREADS="1")
    worker = processes("worker.py", wait_for_workers=1)
    running, *waiting = [_enqueue(redis, fixtures.count_runs, 1) for _ in range(4)]
    wait_until(lambda: _runs(redis, running) == 1, what="the first job to start")
    os.kill(worker.pid, signal.SIGTERM)

    assert worker.wait(timeout=30) == 0
    assert running.get_status() == JobStatus.FINISHED and running.return_value() == 1
    assert [(_runs(redis, job), job.get_status()) for job in waiting] == [(0, JobStatus.QUEUED)] * 3
    assert Queue("default", connection=redis).job_ids == [job.id for job in waiting]
    assert StartedJobRegistry("default", connection=redis).count == 0 and redis.zcard(CLAIMS_KEY) == 0


def test_the_job_of_a_killed_stock_rq_worker_is_found_by_the_schedulers_sweep(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, processes: StartProcess, env: dict[str, str]
) -> None:
    """A stock worker's job heartbeat lasts its monitoring interval + 60 s (RQ's rule); the test moves
    that expiry to now instead of waiting a minute, and only the scheduler's sweep may find the job."""
    _set(monkeypatch, RECOVERY_SWEEP_SECONDS="1")
    processes("scheduler.py")
    stock = processes("rq", "worker", "--url", env["REDIS_URL"], "default", wait_for_workers=1)
    job = _enqueue(redis, fixtures.count_runs, 60, True)  # a minute, on its first run only
    wait_until(lambda: _runs(redis, job) == 1, what="the job to start")
    kill_worker(stock)  # with its work-horse

    registry = StartedJobRegistry("default", connection=redis)
    [(entry, expires)] = cast(list[tuple[bytes, float]], redis.zrange(registry.key, 0, -1, withscores=True))
    assert expires - time.time() > 55, "RQ's own heartbeat TTL, which the sweep waits out"
    assert job.get_status() == JobStatus.STARTED
    redis.zadd(registry.key, {entry: time.time() - 1}, xx=True)

    wait_until(lambda: job.get_status() == JobStatus.QUEUED, what="the sweep to requeue the job")
    job.refresh()
    assert job.retries_left == 3 and job.meta["error"]["type"] == "AbandonedJobError"
    assert Queue("default", connection=redis).job_ids == [job.id]
    processes("worker.py")
    wait_until(lambda: job.get_status() == JobStatus.FINISHED, timeout=30, what="the job's second run")
    assert job.return_value() == 2
