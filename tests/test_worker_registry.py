"""A worker stays in RQ's worker registry, whole, while it waits between jobs: after a job its key has
again the TTL RQ gives an idle worker (WORKER_TTL_SECONDS + 60 s), for both project worker classes."""

from __future__ import annotations

import pytest
from redis import Redis
from rq import Queue, Worker
from rq.job import Job, JobStatus

from tests import fixtures
from tests.conftest import StartProcess
from tests.helpers import wait_until

WORKER_TTL = 600
"""Far above the job heartbeat TTL (JOB_HEARTBEAT_SECONDS + JOB_HEARTBEAT_GRACE_SECONDS), which the
default WORKER_TTL_SECONDS hides: an idle worker's next heartbeat is due WORKER_TTL - 15 s after its last."""


def _idle(redis: Redis) -> bool:
    """Whether a worker waits for jobs: it listens for pushes onto the default queue (`recovery.Wakeups`)."""
    return bool(redis.pubsub_numsub("__keyspace@0__:rq:queue:default")[0][1])


def _finished(job: Job) -> bool:
    return job.get_status() == JobStatus.FINISHED


def _set(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("worker_class", ["simple", "fork"])
def test_a_worker_keeps_its_registry_entry_after_a_short_job(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, processes: StartProcess, worker_class: str
) -> None:
    """The job starts the worker's key with the job's heartbeat TTL; an idle worker's must follow."""
    _set(monkeypatch, WORKER_CLASS=worker_class, WORKER_TTL_SECONDS=str(WORKER_TTL))
    job = Queue("default", connection=redis).enqueue(fixtures.pid)  # before the worker: no idle wait yet
    processes("worker.py")
    wait_until(lambda: _finished(job), timeout=30, what="the job")
    wait_until(lambda: _idle(redis), what="the worker to wait for the next job")

    job.refresh()
    key = f"{Worker.redis_worker_namespace_prefix}{job.worker_name}"
    assert redis.ttl(key) > WORKER_TTL, "the key lives on past the idle worker's next heartbeat"
    fields = redis.hgetall(key)
    assert {b"queues", b"pid", b"birth"} <= fields.keys() and fields[b"state"] == b"idle", fields
    assert key in {worker.key for worker in Worker.all(connection=redis)}


def test_a_worker_whose_key_expired_registers_again_whole(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, processes: StartProcess
) -> None:
    """As if the key had expired (a stalled worker, or keys lost in a failover) and the registry been
    cleaned: the next heartbeat, due a second later with WORKER_TTL_SECONDS=2, writes it all again."""
    _set(monkeypatch, WORKER_TTL_SECONDS="2")
    processes("worker.py", wait_for_workers=1)
    (key,) = Worker.all_keys(connection=redis)
    redis.delete(key, Worker.redis_workers_keys)

    wait_until(lambda: key in {worker.key for worker in Worker.all(connection=redis)}, what="the worker to return")
    fields = redis.hgetall(key)
    assert {b"queues", b"pid", b"birth", b"last_heartbeat"} <= fields.keys() and fields[b"state"] == b"idle", fields
