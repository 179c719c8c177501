"""Worker entry point: `python worker.py [--burst] [--processes N]` serves the queues high, default, low.

It runs RQ's `WorkerPool`: `WORKER_COUNT` worker processes, each started again when it dies. With
the default `WORKER_CLASS=simple` each is RQ's `SimpleWorker` (jobs run in the worker's own process:
no fork per job: about 5x the jobs/s of the forking worker) and is replaced by a fresh process after
`WORKER_MAX_JOBS` jobs or once it holds `WORKER_MAX_MEMORY_MIB`, so a leaking job cannot grow it
without bound; a job that kills its process is found by the crash recovery and run again.
`WORKER_CLASS=fork` gives RQ's forking `Worker` (a fresh process per job: slower, and the choice for
jobs that corrupt their process state). Windows, which cannot fork, always gets `SimpleWorker`.
Both have the crash recovery of `recovery.py`: a job whose process is killed is found within
JOB_HEARTBEAT_SECONDS + JOB_HEARTBEAT_GRACE_SECONDS (+ a maintenance or sweep interval) and retried.
Each runs RQ's built-in scheduler, so retry delays are carried out even where only plain `rq worker`
processes run beside it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from multiprocessing.process import BaseProcess

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.worker import BaseWorker
from rq.worker_pool import ForkProcess, WorkerPool

import connections
import tasks  # noqa: F401  # imported once here, before forking: each process would import it again
from logs import setup_logging
from recovery import RecoveringSimpleWorker, RecoveringWorker
from settings import QUEUE_NAMES, get_settings

log = logging.getLogger("worker")
RESTART_DELAY_SECONDS = 2


def worker_class(platform: str | None = None, kind: str | None = None) -> type[BaseWorker]:
    """`SimpleWorker` on Windows and by default; the forking `Worker` with WORKER_CLASS=fork."""
    if (platform or sys.platform) == "win32" or (kind or get_settings().worker_class) == "simple":
        return RecoveringSimpleWorker
    return RecoveringWorker


def build_worker(connection: Redis | None = None) -> BaseWorker:
    settings = get_settings()
    built = worker_class()(
        list(QUEUE_NAMES),
        connection=connection or connections.settings_client(settings),
        worker_ttl=settings.worker_ttl_seconds,
        maintenance_interval=settings.worker_maintenance_interval_seconds,
        job_monitoring_interval=settings.job_heartbeat_seconds,
    )
    if isinstance(built, RecoveringWorker | RecoveringSimpleWorker):
        built.heartbeat_grace = settings.job_heartbeat_grace_seconds
    if isinstance(built, RecoveringSimpleWorker):
        built.max_jobs_per_process = settings.worker_max_jobs
        built.max_memory_mib = settings.worker_max_memory_mib
    return built


class Pool(WorkerPool):
    """RQ's pool of worker processes, each running `serve` (our worker classes and their settings)."""

    def get_worker_process(self, name: str, burst: bool, _sleep: float = 0, logging_level: str = "INFO") -> BaseProcess:
        return ForkProcess(target=_serve_in_pool, args=(burst,), name=f"worker {name}")


def _serve_in_pool(burst: bool) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):  # the pool's own handlers, until the worker sets its
        signal.signal(signum, signal.SIG_DFL)
    serve(burst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="quit once the queues are empty")
    parser.add_argument("--processes", type=int, help="worker processes (default WORKER_COUNT)")
    args = parser.parse_args(argv)
    settings = get_settings()
    setup_logging(settings.log_level)
    count = args.processes or settings.worker_count
    pool = Pool(list(QUEUE_NAMES), connections.settings_client(settings), num_workers=count)
    log.info("starting %d %s worker process(es)", count, worker_class().__name__)
    pool.start(burst=args.burst, logging_level=settings.log_level)


def serve(burst: bool) -> None:
    """Run one worker until it is asked to stop, or has run its share of jobs (`recycled`).

    RQ's worker waits out a Redis outage while it waits for jobs, but quits when Redis goes away at
    other points of its loop; such a worker is started again here, so workers never need a restart.
    """
    while True:
        worker = None
        try:
            worker = build_worker()
            worker.work(burst=burst, with_scheduler=True)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("redis unavailable (%s)", type(exc).__name__)
        if burst or _asked_to_stop(worker) or getattr(worker, "recycled", False):
            return
        time.sleep(RESTART_DELAY_SECONDS)
        if _asked_to_stop(worker):  # a signal during the pause
            return
        log.warning("worker quit without being asked to; starting it again")


def _asked_to_stop(worker: BaseWorker | None) -> bool:
    """SIGTERM or SIGINT: RQ notes `_stop_requested` only when it comes during a job, the date always."""
    return worker is not None and worker._shutdown_requested_date is not None


if __name__ == "__main__":
    main()
