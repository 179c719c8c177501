"""Job measurements: enqueue rates in this process, workers draining no-op jobs, enqueue → start, emails."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from functools import partial

from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from bench.noop import noop
from bench.stack import API_KEY, QUEUES, Stack, rss_mib
from tests.helpers import stop_process, wait_until

CHUNK = 500
"""Jobs per `enqueue_many` pipeline, and per batch request."""
SOURCES_DOC = "project = enqueue.enqueue_task('noop', {}), plain = queue.enqueue(bench.noop.noop) (imports nothing)"
"""Project jobs run `tasks.noop` with the service's retry policy and callbacks; plain ones are RQ's alone."""


def enqueue_loop(connection: Redis, count: int) -> float:
    """Jobs/s for RQ's plain `queue.enqueue`, one call (and round trips) per job."""
    queue = Queue("default", connection=connection)
    started = time.perf_counter()
    for _ in range(count):
        queue.enqueue(noop)
    return count / (time.perf_counter() - started)


def enqueue_many(connection: Redis, count: int) -> float:
    """Jobs/s for RQ's `enqueue_many`, one pipeline per `CHUNK` jobs."""
    queue = Queue("default", connection=connection)
    started = time.perf_counter()
    for first in range(0, count, CHUNK):
        with connection.pipeline() as pipeline:
            queue.enqueue_many([Queue.prepare_data(noop) for _ in range(min(CHUNK, count - first))], pipeline=pipeline)
            pipeline.execute()
    return count / (time.perf_counter() - started)


def enqueue_tasks(count: int) -> float:
    """Jobs/s for the project's `enqueue.enqueue_task` (validation, retry policy, callbacks, one transaction)."""
    from herald.jobs import enqueue
    from settings import Settings

    settings, started = Settings(), time.perf_counter()
    for _ in range(count):
        enqueue.enqueue_task(settings, "noop", {})
    return count / (time.perf_counter() - started)


def enqueue_one(source: str) -> Job:
    from herald.jobs import enqueue, store
    from settings import Settings

    settings = Settings()
    if source == "project":
        return enqueue.enqueue_task(settings, "noop", {})
    return Queue("default", connection=store.get_redis(settings)).enqueue(noop)


def fill(stack: Stack, source: str, count: int) -> None:
    if source == "project":
        enqueue_tasks(count)
    elif count:
        with stack.redis() as connection:
            enqueue_many(connection, count)


def through_workers(stack: Stack, count: int, cap: float) -> Drain:
    """Project no-op jobs enqueued here and run by the workers already running, for at most `cap` s."""
    with stack.redis() as connection:
        before = finished(connection)
        started = time.perf_counter()
        enqueue_tasks(count)
        with suppress(AssertionError):
            wait_until(lambda: finished(connection) - before >= count, timeout=cap, interval=0.05, what="jobs")
        return Drain(finished(connection) - before, time.perf_counter() - started)


def settle(stack: Stack, timeout: float = 15.0) -> None:
    """Drop the jobs still queued and give the running ones up to `timeout` s to end."""
    with stack.redis() as connection:
        for name in QUEUES:
            Queue(name, connection=connection).empty()
        with suppress(AssertionError):
            wait_until(lambda: not started(connection), timeout=timeout, interval=0.1, what="running jobs")


def started(connection: Redis) -> int:
    return sum(StartedJobRegistry(name, connection=connection).count for name in QUEUES)


def finished(connection: Redis) -> int:
    return sum(FinishedJobRegistry(name, connection=connection).count for name in QUEUES)


@dataclass(frozen=True)
class Drain:
    done: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.done / self.seconds


def drain(stack: Stack, kind: str, source: str, count: int, cap: float) -> Drain:
    """A `--burst` worker of `kind` on `count` queued no-op jobs: from the first job's start to the
    last one's end (the jobs' own timestamps), or with no jobs from the worker's start to its exit.

    Stopped after `cap` seconds if it has not finished by then: the jobs done so far count.
    """
    fill(stack, source, count)
    started = time.perf_counter()
    process = stack.worker(kind, burst=True)
    with suppress(subprocess.TimeoutExpired):
        process.wait(cap)
    elapsed, code = time.perf_counter() - started, process.poll()
    stop_process(process)
    with stack.redis() as connection:
        done, failed = finished(connection), failures(connection)
        busy = busy_seconds(connection) if done > 1 else elapsed
    if code not in (0, None) or failed or (code == 0 and done < count):
        raise RuntimeError(f"{kind} on {source} jobs: exit {code}, {done} of {count} done, {failed} failed")
    stack.flush()
    return Drain(done, busy)


def busy_seconds(connection: Redis) -> float:
    """From the earliest start to the latest end of the finished jobs."""
    ids = [job_id for name in QUEUES for job_id in FinishedJobRegistry(name, connection=connection).get_job_ids()]
    jobs = [job for job in Job.fetch_many(ids, connection=connection) if job]
    starts = [job.started_at for job in jobs if job.started_at]
    ends = [job.ended_at for job in jobs if job.ended_at]
    return (max(ends) - min(starts)).total_seconds()


def failures(connection: Redis) -> int:
    return sum(FailedJobRegistry(name, connection=connection).count for name in QUEUES)


def start_delay_ms(job: Job) -> float:
    """Wait for a job to finish; milliseconds from its enqueueing to its start (both stamped in Redis)."""
    wait_until(lambda: job.get_status() == JobStatus.FINISHED, timeout=30, interval=0.002, what=f"job {job.id}")
    job.refresh()
    assert job.started_at and job.enqueued_at
    return (job.started_at - job.enqueued_at).total_seconds() * 1000


def latency(stack: Stack, kind: str, source: str, jobs: int, cap: float) -> tuple[list[float], float]:
    """Enqueue → start of up to `jobs` sequential jobs on an idle queue, for at most about `cap` seconds;
    and the RSS (MiB) of the worker, idle, before them."""
    process = stack.worker(kind)
    stack.wait_for_workers(1)
    time.sleep(1.0)  # past its start-up work: idle, waiting on the queues
    rss = rss_mib(process.pid)
    delays: list[float] = []
    deadline = time.perf_counter() + cap
    while len(delays) < jobs and time.perf_counter() < deadline:
        delays.append(start_delay_ms(enqueue_one(source)))
        time.sleep(0.01)  # the worker is back waiting before the next job comes
    stop_process(process)
    stack.flush()
    return delays, rss


def post_email(api_url: str, number: int) -> None:
    body = json.dumps({"to": f"user{number}@example.com", "subject": f"Mail {number}", "body": "Hello"}).encode()
    headers = {"Content-Type": "application/json", "X-API-Key": API_KEY}
    request = urllib.request.Request(f"{api_url}/send-email", body, headers)
    with urllib.request.urlopen(request, timeout=30) as answer:
        if answer.status != 202:
            raise RuntimeError(f"POST /send-email answered {answer.status}")


def emails(stack: Stack, count: int, cap: float) -> Drain:
    """Emails from the first POST to the last message in the sink (or `cap` s), through running workers."""
    before = len(stack.sink.messages)
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(partial(post_email, stack.api_url), range(count)))
    with suppress(TimeoutError):
        stack.sink.wait_for(before + count, timeout=max(1.0, started + cap - time.perf_counter()))
    return Drain(len(stack.sink.messages) - before, time.perf_counter() - started)
