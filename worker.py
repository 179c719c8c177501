"""Worker entry point: `python worker.py [--burst]` serves the queues high, default, low in that order.

Uses RQ's forking `Worker` (a fresh work-horse per job) and `SimpleWorker` on Windows,
which cannot fork, both with the crash recovery of `recovery.py`: a job whose worker is killed is
found within JOB_HEARTBEAT_SECONDS + JOB_HEARTBEAT_GRACE_SECONDS (+ a maintenance or sweep interval)
and retried. Runs RQ's built-in scheduler, so retry delays are carried out even where only plain
`rq worker` processes run beside it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.worker import BaseWorker

import tasks  # noqa: F401  # imported once here, before forking: each work-horse would import it again
from logs import setup_logging
from recovery import RecoveringSimpleWorker, RecoveringWorker
from settings import QUEUE_NAMES, get_settings

log = logging.getLogger("worker")
RESTART_DELAY_SECONDS = 2


def worker_class(platform: str | None = None) -> type[BaseWorker]:
    return RecoveringSimpleWorker if (platform or sys.platform) == "win32" else RecoveringWorker


def build_worker(connection: Redis | None = None) -> BaseWorker:
    settings = get_settings()
    built = worker_class()(
        list(QUEUE_NAMES),
        connection=connection or Redis.from_url(settings.redis_url),
        worker_ttl=settings.worker_ttl_seconds,
        maintenance_interval=settings.worker_maintenance_interval_seconds,
        job_monitoring_interval=settings.job_heartbeat_seconds,
    )
    if isinstance(built, RecoveringWorker):
        built.heartbeat_grace = settings.job_heartbeat_grace_seconds
    return built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="quit once the queues are empty")
    args = parser.parse_args(argv)
    setup_logging(get_settings().log_level)
    serve(args.burst)


def serve(burst: bool) -> None:
    """Run a worker until it is asked to stop.

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
        if burst or _asked_to_stop(worker):
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
