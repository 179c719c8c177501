"""The test harness itself: processes are stopped with their work-horses, fakeredis tests reach no real Redis."""

from __future__ import annotations

import contextlib
import os
import signal
from urllib.parse import urlsplit

import fakeredis
import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue
from rq.job import JobStatus

from herald.infra import connections
from settings import Settings
from tests import fixtures
from tests.helpers import descendants, start_process, start_time, stop_process, wait_until


def test_fake_redis_leaves_no_way_to_a_real_redis(fake_redis: fakeredis.FakeRedis) -> None:
    """Code that reads `REDIS_URL` itself (channels, inbox) would otherwise reach the machine's Redis."""
    settings = Settings()
    assert urlsplit(settings.redis_url).port not in (None, 6379), settings.redis_url
    with pytest.raises(RedisConnectionError):
        connections.redis_client(settings).ping()


def test_stopping_a_stock_rq_worker_kills_its_work_horse_too(redis: Redis, env: dict[str, str]) -> None:
    """RQ puts its work-horse in a process group of its own: a kill of the group alone leaves it running."""
    worker = start_process("rq", "worker", "--url", env["REDIS_URL"], "default")
    horse = 0
    try:
        job = Queue("default", connection=redis).enqueue(fixtures.sleep, 60)
        wait_until(lambda: job.get_status() == JobStatus.STARTED, timeout=30, what="the job to start")
        horse = wait_until(lambda: descendants(worker.pid)[0] if descendants(worker.pid) else None)
        assert os.getpgid(horse) != os.getpgid(worker.pid)
        started = start_time(horse)

        stop_process(worker, timeout=1)  # a warm shutdown would wait 60 s for the job

        wait_until(lambda: start_time(horse) != started, timeout=5, what="the work-horse to be gone")
    finally:
        if horse and start_time(horse):
            with contextlib.suppress(ProcessLookupError):
                os.kill(horse, signal.SIGKILL)
        stop_process(worker)
