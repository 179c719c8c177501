"""Job bodies for tests: enqueued by the tests directly, never reachable through the API."""

from __future__ import annotations

import time

from rq import get_current_job

from exceptions import PermanentError, TransientError


def fail_permanently() -> None:
    raise PermanentError("recipient rejected")


def fail_transiently() -> None:
    raise TransientError("server busy")


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def count_runs(seconds: float) -> int:
    """Count this job's runs in Redis (`runs:<job id>`), then sleep; return the count."""
    job = get_current_job()
    assert job is not None, "runs as an RQ job"
    runs = int(job.connection.incr(f"runs:{job.id}"))
    time.sleep(seconds)
    return runs
