"""Per-destination limits (RQ 3.0's `RateLimit`): more workers than the limit, real receivers that
count how many requests they hold at once, and the `rate_limited` status of a job waiting for its slot."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis import Redis
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq.rate_limit import RateLimitRegistry

from herald.api.dashboard import mount_dashboard
from herald.jobs import backpressure, enqueue
from herald.mailsink import MailSink
from herald.rq_seam import limits
from settings import Settings
from tests.conftest import StartProcess
from tests.helpers import wait_until
from tests.receiver import Receiver

NOTE = {"user_id": "u7", "title": "Invoice paid", "body": "INV-7 was paid."}
WORKERS = 3
"""Worker processes: more than the limit the tests set, so that only the limit holds them back."""
HOLD_SECONDS = 0.3


@pytest.fixture
def limited(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """A limit of 2 for each webhook host and for the SMTP server, here and in the workers."""
    for name in ("WEBHOOK_HOST_CONCURRENCY", "SMTP_CONCURRENCY"):
        monkeypatch.setenv(name, "2")
        env[name] = "2"


def _notify(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/notifications", json={**NOTE, **fields})
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _job_ids(answers: list[dict[str, Any]]) -> list[str]:
    return [delivery["job_id"] for answer in answers for delivery in answer["deliveries"]]


def _all_finished(client: TestClient, job_ids: list[str]) -> bool:
    return all(client.get(f"/job/{job_id}").json()["status"] == "finished" for job_id in job_ids)


def _slots_held(redis: Redis, key: str) -> int:
    return int(RateLimitRegistry(key, connection=redis).get_allowed_job_count())


def test_webhook_deliveries_to_one_host_run_at_most_the_limit_at_once(
    client: TestClient, webhooks: Receiver, limited: None, processes: StartProcess, redis: Redis
) -> None:
    webhooks.delay = HOLD_SECONDS
    answers = [_notify(client, channels=["webhook"], webhook_url=f"{webhooks.url}/n{n}") for n in range(8)]
    processes("worker.py", "--processes", str(WORKERS), wait_for_workers=WORKERS)
    wait_until(lambda: _all_finished(client, _job_ids(answers)), timeout=60, interval=0.1, what="deliveries")
    assert len(webhooks.requests) == 8
    assert webhooks.max_in_flight == 2  # never more; and the workers did run two at once
    assert _slots_held(redis, "webhook:127.0.0.1") == 0  # every slot given back


def test_email_to_the_smtp_server_runs_at_most_the_limit_through_every_way_in(
    client: TestClient, smtp: MailSink, limited: None, processes: StartProcess, redis: Redis
) -> None:
    smtp.hold = HOLD_SECONDS
    email = {"to": "ann@example.com", "subject": "Hello", "body": "Hi"}
    ids = [client.post("/send-email", json=email).json()["job_id"] for _ in range(3)]  # the asyncio path
    batch = client.post("/send-email/batch", json={"emails": [email] * 3}).json()  # the bulk path
    ids += [job["job_id"] for job in batch["jobs"]]
    ids += [enqueue.enqueue_task(Settings(), "send_email", email).id]  # the blocking path (POST /jobs)
    ids += _job_ids([_notify(client, channels=["email"], to="bo@example.com")])  # a notification's email
    assert sorted(client.get(f"/job/{job_id}").json()["status"] for job_id in ids[:3]) == [
        "queued",
        "queued",
        "rate_limited",
    ]
    processes("worker.py", "--processes", str(WORKERS), wait_for_workers=WORKERS)
    wait_until(lambda: _all_finished(client, ids), timeout=60, interval=0.1, what="emails")
    assert len(smtp.messages) == len(ids) == 8
    assert smtp.max_in_flight == 2
    assert _slots_held(redis, limits.for_smtp(Settings()).key) == 0  # type: ignore[union-attr]


def test_a_delivery_waiting_for_its_slot_shows_rate_limited_in_the_job_and_the_dashboard(
    client: TestClient, webhooks: Receiver, limited: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [_notify(client, channels=["webhook"], webhook_url=webhooks.url) for _ in range(3)]
    first, second, third = _job_ids(answers)
    assert [client.get(f"/job/{job_id}").json()["status"] for job_id in (first, second)] == ["queued", "queued"]
    assert client.get(f"/job/{third}").json()["status"] == "rate_limited"
    monkeypatch.setenv("DASHBOARD_PASSWORD", "s3cret-pass")
    app = FastAPI()
    assert mount_dashboard(app, Settings())
    with TestClient(app, raise_server_exceptions=False) as dashboard:
        shown = dashboard.get(f"/rq/0/data/job/{third}.json", auth=("admin", "s3cret-pass"))
    assert shown.status_code == 200
    assert shown.json()["status"] == "rate_limited"


def test_a_waiting_delivery_can_be_canceled_and_gives_no_slot_away(
    client: TestClient, webhooks: Receiver, limited: None, redis: Redis
) -> None:
    answers = [_notify(client, channels=["webhook"], webhook_url=webhooks.url) for _ in range(3)]
    waiting = _job_ids(answers)[2]
    assert client.delete(f"/job/{waiting}").status_code == 200
    assert client.get(f"/job/{waiting}").json()["status"] == "canceled"
    assert _slots_held(redis, "webhook:127.0.0.1") == 2


def test_the_limit_key_is_the_host_of_the_url_and_the_smtp_server() -> None:
    settings = Settings().model_copy(update={"smtp_host": "Mail.Example.com", "smtp_port": 587})
    assert limits.for_webhook("https://Hooks.Example.com:8443/a?b=1", settings).key == "webhook:hooks.example.com"
    assert limits.for_channel("email", "x@example.com", settings).key == "smtp:mail.example.com:587"  # type: ignore[union-attr]
    assert limits.for_channel("in_app", None, settings) is None
    assert limits.for_smtp(settings.model_copy(update={"smtp_host": None})) is None


def _failing_command(real: Callable[..., Awaitable[Any]], failing: int) -> Callable[..., Awaitable[Any]]:
    """`execute_command` of the asyncio client, raising instead of sending the `failing`-th command."""
    sent = 0

    async def flaky(self: aioredis.Redis, *args: Any, **options: Any) -> Any:
        nonlocal sent
        sent += 1
        if sent == failing:
            raise RedisConnectionError("injected: the connection dropped before this command")
        return await real(self, *args, **options)

    return flaky


def test_send_email_answered_503_wrote_nothing_and_202_holds_its_slot(
    client: TestClient, smtp: MailSink, limited: None, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis failing on each command of the asyncio path in turn: the answer is a 202 for a job queued in
    its slot, or a 503 for no job at all; never a 503 for a job that is sent all the same (a client
    would send it again), which is what a slot asked for in a second command after the job left."""
    email = {"to": "ann@example.com", "subject": "Hello", "body": "Hi"}
    real, key = aioredis.Redis.execute_command, limits.for_smtp(Settings()).key  # type: ignore[union-attr]
    outcomes = []
    for failing in range(1, 7):
        monkeypatch.setattr(aioredis.Redis, "execute_command", _failing_command(real, failing))
        backpressure._known_lengths.clear()  # the queue's length is read again: one command more to fail
        answer = client.post("/send-email", json=email)
        monkeypatch.setattr(aioredis.Redis, "execute_command", real)
        outcomes.append(answer.status_code)
        if answer.status_code == 503:
            assert redis.keys("rq:job:*") == [], f"command {failing} failed: a 503, but the job was written"
        else:
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["job_id"]
            assert client.get(f"/job/{job_id}").json()["status"] == "queued"
            assert RateLimitRegistry(key, connection=redis).get_allowed_job_ids() == [job_id]
        redis.flushdb()  # the test's own server
    assert 503 in outcomes and outcomes[-1] == 202


def test_jobs_waiting_for_their_slot_count_toward_a_full_queue(
    client: TestClient, smtp: MailSink, limited: None, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job waiting for its slot is in no queue; it counts toward `QUEUE_MAX_WAITING` all the same, so a
    flood to one slow receiver is refused once the backlog is full, through every way in."""
    monkeypatch.setenv("QUEUE_MAX_WAITING", "4")  # before the client's first request: its API reads it then
    email = {"to": "ann@example.com", "subject": "Hello", "body": "Hi"}
    ids = [client.post("/send-email", json=email).json()["job_id"] for _ in range(4)]
    statuses = sorted(client.get(f"/job/{job_id}").json()["status"] for job_id in ids)
    assert statuses == ["queued", "queued", "rate_limited", "rate_limited"]
    for fresh in (False, True):  # this process's own count of what it added, then the count read from Redis
        if fresh:
            backpressure._known_lengths.clear()
        assert client.post("/send-email", json=email).status_code == 429
        assert client.post("/jobs", json={"task": "send_email", "kwargs": email}).status_code == 429
        assert client.post("/send-email/batch", json={"emails": [email]}).status_code == 429
    assert len(redis.keys("rq:job:*")) == 4


def test_the_batch_answer_says_which_emails_wait_for_their_slot(
    client: TestClient, smtp: MailSink, limited: None
) -> None:
    email = {"to": "ann@example.com", "subject": "Hello", "body": "Hi"}
    first = client.post("/send-email/batch", json={"emails": [email] * 3}).json()["jobs"]
    second = client.post("/send-email/batch", json={"emails": [email]}).json()["jobs"]
    answered = [job["status"] for job in first + second]
    assert answered == ["queued", "queued", "rate_limited", "rate_limited"]
    assert [client.get(job["status_url"]).json()["status"] for job in first + second] == answered
