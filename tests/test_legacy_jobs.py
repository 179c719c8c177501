"""Jobs written to Redis by the release before the `herald` package still run.

`tests/legacy_jobs/jobs.json` holds the keys that release wrote for four jobs (see its `make_fixture`
in git history): their functions and callbacks are named by the dotted paths of that release
(`tasks.send_email`, `queues.on_job_failure`, `queues.on_job_success`, ...). They are loaded into
Redis as they were, and run by this release's workers: the project's pool and the stock `rq worker`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq.job import Job, JobStatus

from tests.conftest import StartProcess

FIXTURE = json.loads((Path(__file__).parent / "legacy_jobs" / "jobs.json").read_text())
JOBS: dict[str, str] = FIXTURE["jobs"]


def restore(connection: Redis, keys: dict[str, Any]) -> None:
    """Write each key of the fixture as it was (values are base64 of the bytes Redis held)."""
    decode = base64.b64decode
    for key, entry in keys.items():
        kind, value = entry["type"], entry["value"]
        if kind == "hash":
            connection.hset(key, mapping={decode(k): decode(v) for k, v in value.items()})
        elif kind == "string":
            connection.set(key, decode(value))
        elif kind == "list":
            connection.rpush(key, *(decode(v) for v in value))
        elif kind == "set":
            connection.sadd(key, *(decode(v) for v in value))
        else:
            connection.zadd(key, {decode(member): score for member, score in value})


def test_the_fixture_names_the_old_paths() -> None:
    """What this test guards: the jobs name the release's dotted paths, not the package's."""
    names = {
        base64.b64decode(value).decode(errors="replace")
        for entry in FIXTURE["keys"].values()
        if entry["type"] == "hash"
        for value in entry["value"].values()
    }
    assert {"queues.on_job_failure", "queues.on_job_success"} <= names


@pytest.mark.parametrize(
    "command",
    [("worker.py", "--burst"), ("rq", "worker", "-c", "rqconfig", "--burst", "high", "default", "low")],
    ids=["worker.py", "stock-rq-worker"],
)
def test_jobs_of_the_previous_release_run(
    redis: Redis, processes: StartProcess, smtp: Any, command: tuple[str, ...]
) -> None:
    restore(redis, FIXTURE["keys"])
    assert processes(*command).wait(timeout=60) == 0
    jobs = {name: Job.fetch(job_id, connection=redis) for name, job_id in JOBS.items()}
    for name in ("send_email", "send_email_batch", "deliver_notification"):
        assert jobs[name].get_status() == JobStatus.FINISHED, name
    assert sorted(message["To"] for message in smtp.messages) == ["ann@example.com", "bob@example.com"]
    assert jobs["deliver_notification"].return_value() == {"status": "delivered"}
    assert redis.hget(f"delivery:{JOBS['deliver_notification']}", "status") == b'"delivered"'
    failing = jobs["failing"]
    assert failing.get_status() == JobStatus.FAILED
    assert failing.meta["error"]["type"] == "PermanentError"  # set by the old path's failure callback
    assert redis.hget("metrics:rq_jobs_finished_total", '["send_email"]') == b"2"  # the success callback
