"""Worker entry point: `python worker.py [--burst]` serves the queues high, default, low in that order.

Uses RQ's forking `Worker` (a fresh work-horse per job) and `SimpleWorker` on Windows,
which cannot fork. Runs RQ's built-in scheduler, so retry delays are carried out even
where only plain `rq worker` processes run beside it.
"""

from __future__ import annotations

import argparse
import sys

from redis import Redis
from rq import SimpleWorker, Worker
from rq.worker import BaseWorker

from settings import QUEUE_NAMES, get_settings


def worker_class(platform: str | None = None) -> type[BaseWorker]:
    return SimpleWorker if (platform or sys.platform) == "win32" else Worker


def build_worker(connection: Redis | None = None) -> BaseWorker:
    settings = get_settings()
    connection = connection or Redis.from_url(settings.redis_url)
    return worker_class()(list(QUEUE_NAMES), connection=connection)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="quit once the queues are empty")
    args = parser.parse_args(argv)
    build_worker().work(burst=args.burst, with_scheduler=True)


if __name__ == "__main__":
    main()
