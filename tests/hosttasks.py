"""A job function for the multi-host tests: it records on which host each run started and ended.

Enqueued by the tests directly through RQ (it is not one of the service's tasks); `TEST_HOST` is
set in each worker host's environment.
"""

from __future__ import annotations

import os
import time

from rq import get_current_job

STARTS_KEY = "hosts:starts"
ENDS_KEY = "hosts:ends"
"""Runs that returned: `<job id> <host>` (the starts also name the worker: `<job id> <host> <worker>`)."""
EXITS_KEY = "hosts:exits"
"""Runs that ended, returning or raising."""


def record(seconds: float = 0.0, slow_on: str = "", slow_seconds: float = 0.0, fail_on: str = "") -> str:
    """Sleep `seconds` (`slow_seconds` on host `slow_on`); raise on host `fail_on`; the host's name."""
    host, job = os.environ.get("TEST_HOST", "?"), get_current_job()
    assert job is not None
    job.connection.rpush(STARTS_KEY, f"{job.id} {host} {job.worker_name}")
    try:
        time.sleep(slow_seconds if host == slow_on else seconds)
        if host == fail_on:
            raise RuntimeError(f"the run on {host} fails")
        job.connection.rpush(ENDS_KEY, f"{job.id} {host}")
        return host
    finally:
        job.connection.rpush(EXITS_KEY, f"{job.id} {host}")
