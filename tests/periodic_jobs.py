"""Periodic jobs for tests only, on short schedules: declared by `tests.periodic_scheduler`."""

from __future__ import annotations

from herald.jobs import cron

EVERY_SECOND = cron.PeriodicJob("test-every-second", task="noop", interval=1, priority="high")
EVERY_TWO_SECONDS = cron.PeriodicJob("test-cron-two-seconds", task="noop", cron="* * * * * */2", priority="default")
TEST_JOBS = (EVERY_SECOND, EVERY_TWO_SECONDS)
