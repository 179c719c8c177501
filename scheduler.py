"""Scheduler entry point: `python scheduler.py` moves due jobs onto their queues.

It runs RQ's scheduler, which carries out the retry delays of RQ's `Retry`, so retried
jobs also move on where only plain `rq worker` processes (without `--with-scheduler`) run.
Schedulers coordinate through a lock per queue in Redis: any number may run, one acts.
"""

from __future__ import annotations

import logging

from redis import Redis
from rq.scheduler import RQScheduler

from settings import QUEUE_NAMES, get_settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    connection = Redis.from_url(get_settings().redis_url)
    scheduler = RQScheduler(list(QUEUE_NAMES), connection=connection, interval=1)
    scheduler.acquire_locks()
    scheduler.work()


if __name__ == "__main__":
    main()
