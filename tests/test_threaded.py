"""`ThreadedWorker`: one worker process runs WORKER_THREADS jobs at once, each an RQ execution of its own,
against a real receiver that counts the requests it holds at once; warm shutdown; job timeouts in threads."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.suspension import resume, suspend
from rq.timeouts import JobTimeoutException
from rq.worker import WorkerStatus

from herald.rq_seam import recovery
from herald.rq_seam.recovery import CLAIMS_KEY, ClaimingQueue
from herald.rq_seam.threaded import ThreadedWorker, WatchdogDeathPenalty
from tests import fixtures
from tests.conftest import StartProcess
from tests.helpers import wait_until
from tests.receiver import Receiver

ENDED = (JobStatus.FINISHED, JobStatus.FAILED)
NOTE = {"user_id": "u9", "title": "Order shipped", "body": "On its way."}


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> int:
    """Four threads per worker process, here and in the workers."""
    monkeypatch.setenv("WORKER_THREADS", "4")
    env["WORKER_THREADS"] = "4"
    return 4


def _webhooks(client: TestClient, url: str, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        answer: dict[str, Any] = client.post(
            "/notifications", json={**NOTE, "channels": ["webhook"], "webhook_url": url}
        ).json()
        ids.append(answer["deliveries"][0]["job_id"])
    return ids


def _status(client: TestClient, job_id: str) -> str:
    return str(client.get(f"/job/{job_id}").json()["status"])


def test_one_process_runs_its_threads_jobs_at_once_each_in_the_registries(
    client: TestClient, webhooks: Receiver, threads: int, processes: StartProcess, redis: Redis
) -> None:
    webhooks.delay = 0.5
    ids = _webhooks(client, webhooks.url, 8)
    processes("worker.py", "--processes", "1", wait_for_workers=1)
    wait_until(lambda: all(_status(client, job_id) == "finished" for job_id in ids), timeout=60, what="deliveries")
    assert webhooks.max_in_flight == threads
    assert set(FinishedJobRegistry("default", connection=redis).get_job_ids()) == set(ids)


def test_the_end_of_the_last_running_job_sets_the_worker_idle_in_its_own_script(redis: Redis) -> None:
    """Each end sees the starts (the worker's execution index): no write of its own, and no `idle` while a
    job started meanwhile runs. The runs here go past `_run`, whose own `idle` write would hide a miss."""
    queue = Queue("default", connection=redis)
    for _ in range(2):
        queue.enqueue(fixtures.pid)
    worker = ThreadedWorker(["default"], connection=redis)
    worker.register_birth()
    with recovery.pops_start(worker):
        popped = [ClaimingQueue.dequeue_any(worker.queues, None, connection=redis) for _ in range(2)]
    started = [(job, worker.prepare_execution(job)) for job, _ in filter(None, popped)]
    states = []
    try:
        for job, execution in started:
            assert worker.perform_job(job, queue, execution)
            states.append(redis.hget(worker.key, "state"))
    finally:
        worker.job_heartbeats.stop()
    assert states == [b"busy", b"idle"]


def test_a_burst_runs_the_dependents_its_running_jobs_queue(redis: Redis) -> None:
    """The queues are empty while the parent runs; its end queues the child, which the burst must still run."""
    queue = Queue("default", connection=redis)
    parent = queue.enqueue(fixtures.sleep, 0.2)
    child = queue.enqueue(fixtures.pid, depends_on=parent)
    worker = ThreadedWorker(["default"], connection=redis)
    assert worker.work(burst=True)
    assert (parent.get_status(), child.get_status()) == (JobStatus.FINISHED, JobStatus.FINISHED)


@pytest.mark.timeout(30, method="thread")  # a miss hangs the second burst where a signal cannot end it
def test_a_worker_works_again_after_a_burst(redis: Redis) -> None:
    """Its threads ended with the first burst: the second makes its own (RQ's tests reuse a worker so)."""
    queue = Queue("default", connection=redis)
    worker = ThreadedWorker(["default"], connection=redis)
    worker.set_threads(1)  # a thread short, the second burst would hand its job to no one
    jobs = []
    for _ in range(2):
        jobs.append(queue.enqueue(fixtures.pid))
        assert worker.work(burst=True)
    assert [job.get_status() for job in jobs] == [JobStatus.FINISHED] * 2


def test_warm_shutdown_lets_the_running_jobs_finish_and_takes_no_other(
    client: TestClient, webhooks: Receiver, threads: int, processes: StartProcess, redis: Redis
) -> None:
    webhooks.delay = 1.5
    ids = _webhooks(client, webhooks.url, threads + 2)
    worker = processes("worker.py", "--processes", "1", wait_for_workers=1)
    wait_until(lambda: webhooks.in_flight == threads, timeout=30, what="a delivery per thread held by the receiver")
    os.killpg(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    statuses = [_status(client, job_id) for job_id in ids]
    assert sorted(statuses) == ["finished"] * threads + ["queued"] * 2, statuses
    assert redis.zcard(CLAIMS_KEY) == 0 and len(webhooks.requests) == threads


def test_a_job_over_its_timeout_fails_in_its_thread(
    client: TestClient,
    webhooks: Receiver,
    threads: int,
    processes: StartProcess,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
) -> None:
    for name, value in {"JOB_TIMEOUT_SECONDS": "1", "WEBHOOK_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
        env[name] = value
    webhooks.delay = 5
    (job_id,) = _webhooks(client, webhooks.url, 1)
    processes("worker.py", "--processes", "1", wait_for_workers=1)
    wait_until(lambda: _status(client, job_id) == "failed", timeout=30, what="the job to time out")
    assert client.get(f"/job/{job_id}").json()["error"]["type"] == "JobTimeoutException"


def test_a_canceled_timeout_never_hits_the_next_job_of_its_thread(
    redis: Redis, threads: int, processes: StartProcess
) -> None:
    """The pooled threads run one job after another: a job that ended before its timeout leaves no
    timer behind that would fire in its thread's next job."""
    queue = Queue("default", connection=redis)
    short = [queue.enqueue(fixtures.sleep, 0.2, job_timeout=3) for _ in range(threads)]
    processes("worker.py", "--processes", "1", wait_for_workers=1)
    wait_until(lambda: all(job.get_status() == JobStatus.FINISHED for job in short), timeout=30, what="short jobs")
    long = [queue.enqueue(fixtures.sleep, 4, job_timeout=20) for _ in range(threads)]  # past the short ones' 3 s
    wait_until(lambda: all(job.get_status() in ENDED for job in long), timeout=60, what="long jobs")
    assert [job.get_status() for job in long] == [JobStatus.FINISHED] * threads


def test_a_forked_child_gets_a_watchdog_of_its_own() -> None:
    """The parent's timeouts thread and deadlines stay with the parent: a child forked while one runs
    starts its own, and its jobs still time out."""
    parent_penalty = WatchdogDeathPenalty(30, JobTimeoutException)
    parent_penalty.setup_death_penalty()
    try:
        with warnings.catch_warnings():  # Python 3.12+ warns of fork() in a process with threads: meant here
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: a job past its 0.2 s timeout is stopped in its own process
            code = 1
            try:
                with WatchdogDeathPenalty(0.2, JobTimeoutException):
                    time.sleep(5)
            except JobTimeoutException:
                code = 0
            os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        parent_penalty.cancel_death_penalty()


def test_a_short_timeout_set_while_the_watchdog_waits_for_a_longer_one_fires_on_time() -> None:
    """The watchdog's thread sleeps until its earliest deadline: a deadline earlier than that wakes it."""
    longer = WatchdogDeathPenalty(30, JobTimeoutException)
    longer.setup_death_penalty()
    try:
        started = time.monotonic()
        with pytest.raises(JobTimeoutException), WatchdogDeathPenalty(0.3, JobTimeoutException):
            for _ in range(50):  # the exception comes between two sleeps
                time.sleep(0.1)
        assert time.monotonic() - started < 2
    finally:
        longer.cancel_death_penalty()


def _script_calls(redis: Redis) -> int:
    stats: dict[str, dict[str, int]] = redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(stats.get("cmdstat_eval", {}).get("calls", 0))


def test_short_jobs_are_taken_one_after_another_by_the_end_of_the_one_before(redis: Redis) -> None:
    """One script per job: each end pops and starts the next for its thread, instead of the main thread's
    pop (a second script) and a hand-over to another thread."""
    queue = Queue("default", connection=redis)
    jobs = [queue.enqueue(fixtures.pid) for _ in range(100)]
    worker = ThreadedWorker(["default"], connection=redis)
    worker.set_threads(4)
    before = _script_calls(redis)
    assert worker.work(burst=True)
    assert [job.get_status() for job in jobs] == [JobStatus.FINISHED] * len(jobs)
    assert _script_calls(redis) - before < 1.2 * len(jobs), "about one script per job"
    assert redis.zcard("rq:wip:default") == 0 and redis.scard(worker.executions_key) == 0


def test_a_suspended_threaded_worker_takes_no_job_until_resumed(
    redis: Redis, threads: int, processes: StartProcess, env: dict[str, str]
) -> None:
    """`rq suspend` stops the jobs' ends from taking the next, as it stops the main thread's pops."""
    queue = Queue("default", connection=redis)
    jobs = [queue.enqueue(fixtures.sleep, 0.01) for _ in range(1000)]
    worker = processes("worker.py", "--processes", "1", wait_for_workers=1)
    wait_until(lambda: FinishedJobRegistry("default", connection=redis).count >= 20, what="jobs to run")
    suspend(redis)
    registry = StartedJobRegistry("default", connection=redis)
    wait_until(lambda: registry.count == 0 and _states(redis) == [b"suspended"], timeout=10, what="the suspension")
    suspended_at = time.time()
    left = queue.count
    assert left > 0, "the jobs ran out before the suspension: more jobs, or longer ones"
    resume(redis)
    resumed_at = time.time()
    wait_until(lambda: queue.count == 0 and registry.count == 0, timeout=60, what="the rest of the jobs")
    for job in jobs:
        job.refresh()
    starts = [job.started_at.timestamp() for job in jobs if job.started_at is not None]
    assert len(starts) == len(jobs) and not [moment for moment in starts if suspended_at < moment < resumed_at]
    assert worker.poll() is None


def _states(redis: Redis) -> list[bytes]:
    keys: set[bytes] = redis.smembers("rq:workers")  # type: ignore[assignment]
    return [bytes(redis.hget(key, "state") or b"") for key in keys]  # type: ignore[arg-type]


def test_a_sigtermed_worker_whose_thread_takes_short_jobs_one_after_another_stops_with_none_left_started(
    redis: Redis, threads: int, processes: StartProcess
) -> None:
    """The main thread waits while a job thread's ends pop the next (`_wait_for_the_chain`): a stop ends
    that wait, the running job finishes, and the ends pop no more."""
    queue = Queue("default", connection=redis)
    jobs = [queue.enqueue(fixtures.sleep, 0.002) for _ in range(3000)]
    worker = processes("worker.py", "--processes", "1", wait_for_workers=1)
    finished = FinishedJobRegistry("default", connection=redis)
    wait_until(lambda: finished.count >= 50, what="jobs to run")
    os.kill(worker.pid, signal.SIGTERM)

    assert worker.wait(timeout=30) == 0
    assert StartedJobRegistry("default", connection=redis).count == 0 and redis.zcard(CLAIMS_KEY) == 0
    statuses = [job.get_status() for job in jobs]
    assert set(statuses) == {JobStatus.FINISHED, JobStatus.QUEUED}, "the rest left queued"
    assert statuses.count(JobStatus.QUEUED) == queue.count


def test_a_threaded_worker_resumed_with_no_job_running_is_idle(redis: Redis) -> None:
    """RQ's look for a suspension waits until the worker is resumed, then writes back the state from before
    it (busy: its jobs were running then), though they ended meanwhile."""
    worker = ThreadedWorker(["default"], connection=redis)
    worker.register_birth()
    worker.set_state(WorkerStatus.BUSY)
    suspend(redis)
    resumer = threading.Timer(0.2, resume, args=(redis,))
    resumer.start()
    try:
        worker.check_for_suspension(burst=False)
        assert redis.hget(worker.key, "state") == b"idle"
    finally:
        resumer.join()
        worker.register_death()
