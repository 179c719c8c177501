"""Worker entry point: `python worker.py [--burst] [--processes N]` serves the queues high, default, low.

It keeps `WORKER_COUNT` worker processes running, each started again when it dies: one under a supervisor
that imports nothing of the service (`herald/infra/supervisor.py`; why: its docstring), more in RQ's
`WorkerPool`. `--one-process` runs one worker in the process itself, for a process manager (systemd, a
container's restart policy) to keep running; so does Windows, which cannot fork. With
the default `WORKER_CLASS=simple` each is RQ's `SimpleWorker` (jobs run in the worker's own process:
no fork per job: about 5x the jobs/s of the forking worker) and is replaced by a fresh process after
`WORKER_MAX_JOBS` jobs or once it has held `WORKER_MAX_MEMORY_MIB` (its peak), so a leaking job cannot grow it
without bound; a job that kills its process is found by the crash recovery and run again.
`WORKER_CLASS=fork` gives RQ's forking `Worker` (a fresh process per job: slower, and the choice for
jobs that corrupt their process state). Windows, which cannot fork, always gets `SimpleWorker`.
Both have the crash recovery of `recovery.py`: a job whose process is killed is found within
JOB_HEARTBEAT_SECONDS + JOB_HEARTBEAT_GRACE_SECONDS (+ a maintenance or sweep interval) and retried.
Each runs RQ's built-in scheduler, so retry delays are carried out even where only plain `rq worker`
processes run beside it.

With `--burst` the pool replaces a recycled (or crashed) process until one finds the queues empty, and
exits 0 only if every process ended so; 1 if one could not drain them (Redis unavailable, a crash, a stop).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.worker import BaseWorker
from rq.worker_pool import ForkProcess

import tasks  # noqa: F401  # imported once here, before forking: each process would import it again
from herald.infra import connections, supervisor
from herald.infra.logs import log_format_for, setup_logging_from
from herald.infra.supervisor import Ending
from herald.rq_seam.pool import Pool, asked_to_stop
from herald.rq_seam.recovery import RecoveringSimpleWorker, RecoveringWorker
from herald.rq_seam.threaded import ThreadedWorker
from settings import QUEUE_NAMES, Settings, settings_or_exit

log = logging.getLogger("worker")
RESTART_DELAY_SECONDS = 2


def worker_class(settings: Settings, platform: str | None = None) -> type[BaseWorker]:
    """`SimpleWorker` on Windows and by default, running WORKER_THREADS jobs at once (`ThreadedWorker`)
    when that is over 1; the forking `Worker` with WORKER_CLASS=fork."""
    if (platform or sys.platform) == "win32" or settings.worker_class == "simple":
        return ThreadedWorker if settings.worker_threads > 1 else RecoveringSimpleWorker
    return RecoveringWorker


def build_worker(settings: Settings, connection: Redis | None = None) -> BaseWorker:
    built = worker_class(settings)(
        list(QUEUE_NAMES),
        connection=connection or connections.settings_client(settings),
        worker_ttl=settings.worker_ttl_seconds,
        maintenance_interval=settings.worker_maintenance_interval_seconds,
        job_monitoring_interval=settings.job_heartbeat_seconds,
    )
    built.log_result_lifespan = False  # RQ's "result is kept for N seconds" line after every job
    if isinstance(built, RecoveringWorker | RecoveringSimpleWorker):
        built.heartbeat_grace = settings.job_heartbeat_grace_seconds
    if isinstance(built, RecoveringSimpleWorker):
        built.max_jobs_per_process = settings.worker_max_jobs
        built.max_memory_mib = settings.worker_max_memory_mib
    if isinstance(built, ThreadedWorker):
        built.set_threads(settings.worker_threads)
    return built


def _serve_in_pool(burst: bool) -> None:
    for signum in supervisor.STOP_SIGNALS:  # the pool's own handlers, until the worker sets its
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, supervisor.STOP_SIGNALS)  # blocked by `_supervise_one`
    sys.exit(int(serve(burst, settings_or_exit())))  # each pool process reads them again


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="quit once the queues are empty")
    parser.add_argument("--processes", type=int, help="worker processes (default WORKER_COUNT)")
    parser.add_argument("--one-process", action="store_true", help="one worker, in this process, unsupervised")
    args = parser.parse_args(argv)
    settings = settings_or_exit()
    setup_logging_from(settings)
    count = args.processes or settings.worker_count
    if args.one_process or not hasattr(os, "fork"):
        gc.freeze()  # what the imports made: the worker's collections never go through it again
        sys.exit(int(serve(args.burst, settings)))
    log.info("starting %d %s worker process(es)", count, worker_class(settings).__name__)
    if count == 1:
        _supervise_one(args.burst, settings)
    pool = Pool(list(QUEUE_NAMES), connections.settings_client(settings), num_workers=count, serve=_serve_in_pool)
    gc.freeze()  # what is loaded now stays shared with the processes forked: their GC never writes to it
    pool.start(burst=args.burst, logging_level=settings.log_level)
    if args.burst and not pool.drained:
        log.error("burst ended before the queues were empty")
        sys.exit(1)


def _supervise_one(burst: bool, settings: Settings) -> NoReturn:
    """Fork the worker, then become the supervisor (exec): the worker starts without importing anything
    again, and no copy of its pages stays behind in its parent. The stop signals are blocked from before
    the fork until the supervisor's handlers are in place, so that none is lost between."""
    signal.pthread_sigmask(signal.SIG_BLOCK, supervisor.STOP_SIGNALS)
    gc.freeze()
    child = ForkProcess(target=_serve_in_pool, args=(burst,), name="worker 1")
    child.start()
    assert child.pid is not None  # set by `start`
    restart = [sys.executable, str(Path(__file__).resolve()), "--one-process", *(["--burst"] if burst else [])]
    command = supervisor.command(child.pid, burst, log_format_for(settings), settings.log_level, restart)
    logging.shutdown()
    os.execv(command[0], command)


def serve(burst: bool, settings: Settings) -> Ending:
    """Run one worker until it is asked to stop, has run its share of jobs, or (burst) has found the
    queues empty; how it ended.

    RQ's worker waits out a Redis outage while it waits for jobs, but quits when Redis goes away at
    other points of its loop; such a worker is started again here, so workers never need a restart.
    A burst worker is not: its process ends `UNAVAILABLE`.
    """
    while True:
        worker = _run_worker(burst, settings)
        ending = _ending(worker)
        if ending is not None:
            return ending
        if burst:
            return Ending.UNAVAILABLE
        time.sleep(RESTART_DELAY_SECONDS)
        if asked_to_stop(worker):  # a signal during the pause
            return Ending.STOPPED
        log.warning("worker quit without being asked to; starting it again")


def _run_worker(burst: bool, settings: Settings) -> BaseWorker | None:
    """A worker, once it has stopped working; None if it could not be made (Redis unavailable)."""
    worker = None
    try:
        worker = build_worker(settings)
        worker.work(burst=burst, with_scheduler=True)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("redis unavailable (%s)", type(exc).__name__)
    return worker


def _ending(worker: BaseWorker | None) -> Ending | None:
    """Why `worker` stopped; None if for none of the reasons of `Ending` (Redis went away, an error)."""
    if asked_to_stop(worker):
        return Ending.STOPPED
    if getattr(worker, "recycled", False):
        return Ending.RECYCLED
    if getattr(worker, "found_queues_empty", False):
        return Ending.DRAINED
    return None


if __name__ == "__main__":
    main()
