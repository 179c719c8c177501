"""Delayed jobs through rq-scheduler: validation, status, cancel, precision, one scheduler at a time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue

from herald.jobs.store import DELAYED_JOBS_KEY
from herald.mailsink import MailSink
from tests.conftest import StartProcess
from tests.helpers import wait_until

EMAIL = {"to": "ann@example.com", "subject": "Later", "body": "Hello from the past"}


def _in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def _finished(client: TestClient, job_id: str, timeout: float = 15) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/job/{job_id}").json()
        return job if job["status"] == "finished" else None

    return wait_until(done, timeout, interval=0.05, what=f"job {job_id} to finish")


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"delay_seconds": 5, "send_at": _in(5)}, "not both"),
        ({"send_at": "2030-01-01T10:00:00"}, "timezone"),
        ({"send_at": _in(31 * 86_400)}, "within 30 days"),
        ({"send_at": _in(-3600)}, "in the past"),
        ({"delay_seconds": -1}, "greater than or equal to 0"),
    ],
)
def test_bad_schedules_are_422(client: TestClient, redis: Redis, schedule: dict[str, Any], message: str) -> None:
    response = client.post("/send-email", json={**EMAIL, **schedule})
    assert response.status_code == 422
    assert message in str(response.json()["detail"])
    assert redis.zcard(DELAYED_JOBS_KEY) == 0


def test_delayed_job_is_scheduled_listed_and_visible(client: TestClient, redis: Redis) -> None:
    before = datetime.now(UTC)
    answer = client.post("/jobs", json={"task": "noop", "delay_seconds": 600}).json()
    assert answer["status"] == "scheduled"
    due = datetime.fromisoformat(answer["scheduled_for"])
    assert before + timedelta(seconds=600) <= due <= datetime.now(UTC) + timedelta(seconds=600)
    job = client.get(answer["status_url"]).json()
    assert (job["status"], job["scheduled_for"], job["retries_left"]) == ("scheduled", answer["scheduled_for"], 4)
    soon = client.post("/send-email", json={**EMAIL, "send_at": _in(300)}).json()
    listed = client.get("/jobs/scheduled").json()
    assert listed["total"] == 2 and [j["id"] for j in listed["jobs"]] == [soon["job_id"], answer["job_id"]]
    assert all(Queue(name, connection=redis).count == 0 for name in ("high", "default", "low"))


def test_delayed_email_is_sent_on_time_never_early(client: TestClient, smtp: MailSink, processes: StartProcess) -> None:
    processes("worker.py", wait_for_workers=1)
    processes("scheduler.py")
    answers = [client.post("/send-email", json={**EMAIL, "delay_seconds": 2}).json() for _ in range(5)]
    smtp.wait_for(5, timeout=20)
    for answer in answers:
        job = _finished(client, answer["job_id"])
        late = (
            datetime.fromisoformat(job["started_at"]) - datetime.fromisoformat(answer["scheduled_for"])
        ).total_seconds()
        assert late >= 0, f"started {-late:.3f} s before its due time"  # how late: `python -m bench`


def test_slightly_past_send_at_runs_at_once(client: TestClient, smtp: MailSink, processes: StartProcess) -> None:
    processes("worker.py", wait_for_workers=1)
    processes("scheduler.py")
    answer = client.post("/send-email", json={**EMAIL, "send_at": _in(-10)}).json()
    assert answer["status"] == "scheduled"
    smtp.wait_for(1)
    assert _finished(client, answer["job_id"])


def test_canceled_scheduled_job_never_runs(client: TestClient, smtp: MailSink, processes: StartProcess) -> None:
    canceled = client.post("/send-email", json={**EMAIL, "subject": "canceled", "delay_seconds": 1}).json()
    assert client.delete(canceled["status_url"]).json()["status"] == "canceled"
    processes("worker.py", wait_for_workers=1)
    processes("scheduler.py")
    kept = client.post("/send-email", json={**EMAIL, "subject": "kept", "delay_seconds": 1}).json()
    _finished(client, kept["job_id"])
    assert [message["Subject"] for message in smtp.messages] == ["kept"]
    assert client.get(canceled["status_url"]).json()["status"] == "canceled"


def test_delayed_job_keeps_its_retries(client: TestClient, smtp: MailSink, processes: StartProcess) -> None:
    processes("worker.py", wait_for_workers=1)
    processes("scheduler.py")
    smtp.fail_next(1)
    answer = client.post("/send-email", json={**EMAIL, "delay_seconds": 0}).json()
    assert _finished(client, answer["job_id"], timeout=20)["retries_left"] == 3


def test_two_schedulers_send_each_delayed_job_once(
    client: TestClient, smtp: MailSink, processes: StartProcess, redis: Redis
) -> None:
    processes("scheduler.py")
    processes("scheduler.py")
    processes("worker.py")
    processes("worker.py", wait_for_workers=2)
    answers = [
        client.post("/send-email", json={**EMAIL, "subject": f"n{n}", "delay_seconds": 1 + n / 10}).json()
        for n in range(20)
    ]
    for answer in answers:
        _finished(client, answer["job_id"], timeout=30)
    assert redis.zcard(DELAYED_JOBS_KEY) == 0
    assert all(Queue(name, connection=redis).count == 0 for name in ("high", "default", "low"))
    assert sorted(message["Subject"] for message in smtp.messages) == sorted(f"n{n}" for n in range(20))
