"""`worker.py` with one worker process (the default): the worker is forked, and its parent becomes a
supervisor (`herald/infra/supervisor.py`) that holds none of the worker's imports; `--one-process` runs the
worker in the process itself. What a pool of processes does for its workers is in test_worker_pool.py."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus

from herald.infra.supervisor import Ending, Step, next_step
from tests import fixtures
from tests.conftest import StartProcess
from tests.helpers import start_process, stop_process, wait_until

COMPILED_IMPORTS = ("pydantic_core", "site-packages")
"""What a process that imported the service maps: pydantic's compiled core, anything from the venv."""


def _pid_of_a_job(redis: Redis) -> int:
    job = Queue("default", connection=redis).enqueue(fixtures.pid)
    wait_until(lambda: job.get_status() == JobStatus.FINISHED, timeout=30, what="the job")
    return int(job.return_value() or 0)


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_worker_is_supervised_by_a_process_that_loaded_none_of_its_imports(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, processes: StartProcess
) -> None:
    monkeypatch.setenv("WORKER_COUNT", "1")
    supervisor = processes("worker.py", wait_for_workers=1)
    worker = _pid_of_a_job(redis)

    assert worker != supervisor.pid
    assert all(name in _maps(worker) for name in COMPILED_IMPORTS)
    assert not any(name in _maps(supervisor.pid) for name in COMPILED_IMPORTS)


def test_one_process_runs_the_worker_in_itself(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, processes: StartProcess
) -> None:
    monkeypatch.setenv("WORKER_COUNT", "1")
    process = processes("worker.py", "--one-process", wait_for_workers=1)

    assert _pid_of_a_job(redis) == process.pid


def test_the_supervisors_lines_are_in_the_service_log_format(redis: Redis) -> None:
    """Every line on the output is one JSON object, the supervisor's report of a recycled worker among them."""
    env = {"WORKER_COUNT": "1", "WORKER_MAX_JOBS": "1", "WORKER_THREADS": "1", "LOG_FORMAT": "json"}
    jobs = [Queue("default", connection=redis).enqueue(fixtures.pid) for _ in range(2)]
    with tempfile.TemporaryFile() as output:
        process = start_process("worker.py", env=env, output=output)
        try:
            wait_until(lambda: all(job.get_status() == JobStatus.FINISHED for job in jobs), 30, what="2 jobs")
        finally:
            stop_process(process)
        output.seek(0)
        lines = [json.loads(line) for line in output.read().decode().splitlines()]

    supervisor = [line for line in lines if "ended with status 3" in line["message"]]
    assert len(supervisor) == 1 and supervisor[0]["level"] == "INFO" and supervisor[0]["logger"] == "worker"
    assert _pids(jobs)[0] != _pids(jobs)[1] and process.returncode == 0


def _pids(jobs: list[Job]) -> list[object]:
    return [job.return_value() for job in jobs]


KILLED = -9
STEPS = [
    # (exit status, burst, asked to stop) -> step
    (Ending.RECYCLED, False, False, Step.START),
    (Ending.UNAVAILABLE, False, False, Step.START_AFTER_PAUSE),
    (Ending.STOPPED, False, False, Step.START_AFTER_PAUSE),  # someone stopped the worker, not the service
    (KILLED, False, False, Step.START_AFTER_PAUSE),
    (Ending.STOPPED, False, True, Step.EXIT),
    (KILLED, False, True, Step.EXIT),
    (Ending.DRAINED, True, False, Step.EXIT),
    (Ending.RECYCLED, True, False, Step.START),
    (KILLED, True, False, Step.START_UNFINISHED),
    (70, True, False, Step.START_UNFINISHED),  # a job's os._exit
    (Ending.UNAVAILABLE, True, False, Step.FAIL),
    (Ending.STOPPED, True, False, Step.FAIL),
    (Ending.DRAINED, True, True, Step.FAIL),  # a stopped burst did not drain the queues
]


@pytest.mark.parametrize(("status", "burst", "stopping", "expected"), STEPS)
def test_what_follows_the_end_of_a_worker(status: int, burst: bool, stopping: bool, expected: Step) -> None:
    assert next_step(status, burst, stopping) is expected
