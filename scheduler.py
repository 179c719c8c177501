"""Scheduler entry point: `python scheduler.py` moves due jobs onto their queues, every second.

One loop runs two schedulers:
- rq-scheduler, for delayed jobs (`delay_seconds` / `send_at`), with its lock so that only one
  of several scheduler processes moves jobs at a time;
- RQ's own scheduler, for the delays of RQ's `Retry`, so retries move on even where only plain
  `rq worker` processes (without `--with-scheduler`) run. It holds a lock per queue.

Every `RECOVERY_SWEEP_SECONDS` it also runs `recovery.sweep`, so that the jobs of killed workers are
retried (or failed) even while no worker is alive to run RQ's registry maintenance.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.scheduler import RQScheduler
from rq_scheduler import Scheduler

import connections
import recovery
from logs import setup_logging
from settings import QUEUE_NAMES, get_settings

log = logging.getLogger("scheduler")


class DelayedJobScheduler(Scheduler):  # type: ignore[misc]
    """rq-scheduler, comparing due times to the fraction of a second: a job never starts early."""

    def get_jobs_to_queue(self, with_times: bool = False) -> Any:
        return self.get_jobs(time.time(), with_times=with_times)


class SchedulerLoop:
    def __init__(self, connection: Redis, interval: float, sweep_every: float = 5.0) -> None:
        self.connection = connection
        self.interval = interval
        self.sweep_every = sweep_every
        self.next_sweep = 0.0
        self.delayed = DelayedJobScheduler(connection=connection, interval=interval)
        self.retries = RQScheduler(list(QUEUE_NAMES), connection=connection, interval=max(1, round(interval)))
        self.stopping = False

    def tick(self) -> None:
        if self.delayed.acquire_lock():
            try:
                self.delayed.enqueue_jobs()
            finally:
                self.delayed.remove_lock()
        if self.retries.acquired_locks != set(QUEUE_NAMES):
            self.retries.acquire_locks()  # at once, not only every two minutes as RQ's own loop does
        self.retries.heartbeat()
        self.retries.enqueue_scheduled_jobs()
        self.delayed.heartbeat()
        if time.monotonic() >= self.next_sweep:
            self.next_sweep = time.monotonic() + self.sweep_every
            self.sweep()

    def sweep(self) -> None:
        """Recover the jobs of killed workers; a job that cannot be loaded must not stop the loop."""
        try:
            recovery.sweep(self.connection)
        except (RedisConnectionError, RedisTimeoutError):
            raise
        except Exception:
            log.exception("recovery sweep failed")

    def run(self) -> None:
        self.delayed.register_birth()
        self.retries.register_birth()
        try:
            while not self.stopping:
                started = time.monotonic()
                try:
                    self.tick()
                except (RedisConnectionError, RedisTimeoutError) as exc:  # Redis away: wait, then go on
                    log.warning("redis unavailable (%s); retrying in %.1f s", type(exc).__name__, self.interval)
                time.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            self.retries.stop()
            self.delayed.register_death()

    def stop(self, *_: object) -> None:
        self.stopping = True


def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    loop = SchedulerLoop(
        connections.settings_client(settings), settings.scheduler_interval_seconds, settings.recovery_sweep_seconds
    )
    signal.signal(signal.SIGTERM, loop.stop)
    signal.signal(signal.SIGINT, loop.stop)
    log.info("scheduler started: delayed jobs and retry delays, every %.1f s", loop.interval)
    loop.run()


if __name__ == "__main__":
    main()
