"""Job bodies for tests: enqueued by the tests directly, never reachable through the API."""

from __future__ import annotations

import os
import time

from rq import get_current_job

import tasks
from herald.exceptions import PermanentError, TransientError


def fail_permanently() -> None:
    raise PermanentError("recipient rejected")


def fail_transiently() -> None:
    raise TransientError("server busy")


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _count_run() -> int:
    """Count this run of the current job in Redis (`runs:<job id>`); the count so far."""
    job = get_current_job()
    assert job is not None, "runs as an RQ job"
    return int(job.connection.incr(f"runs:{job.id}"))


def count_runs(seconds: float, first_run_only: bool = False) -> int:
    """Count this job's runs in Redis (`runs:<job id>`), then sleep `seconds` (with `first_run_only`, on
    its first run only); return the count."""
    runs = _count_run()
    if runs == 1 or not first_run_only:
        time.sleep(seconds)
    return runs


def pid() -> int:
    """The id of the process that runs the job."""
    return os.getpid()


_leaked: list[bytes] = []


def leak(mib: int) -> int:
    """Keep `mib` MiB for the rest of the process's life, as a leaking job does; the process id."""
    _leaked.append(b"x" * (mib * 2**20))
    return os.getpid()


def die_on_first_run() -> int:
    """Kill the process that runs the job on its first run (as a crash in C code would); the count
    of runs (`runs:<job id>`) on the next."""
    runs = _count_run()
    if runs == 1:
        os._exit(70)
    return runs


def send_email_then_sleep(seconds: float, to: str, subject: str, body: str) -> dict[str, str]:
    """`tasks.send_email`, then a count of its returns (`returned:<job id>`) and a sleep: a worker
    killed in that sleep has had its email accepted by the server, and not finished the job."""
    job = get_current_job()
    assert job is not None, "runs as an RQ job"
    result = tasks.send_email(to, subject, body)
    job.connection.incr(f"returned:{job.id}")
    time.sleep(seconds)
    return result


def delete_own_job() -> str:
    """Delete this job's hash while it runs (as `rq` commands or a person may) and return."""
    job = get_current_job()
    assert job is not None
    job.connection.delete(job.key)
    return "deleted"
