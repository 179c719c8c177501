"""End to end: the API, a real Redis, real worker processes and a real SMTP server."""

from __future__ import annotations

import re
import socket
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from fastapi.testclient import TestClient
from redis import Redis

from herald.mailsink import MailSink
from herald.notify.channels import email
from settings import Settings
from tests.conftest import StartProcess
from tests.helpers import wait_until

EMAIL = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}


def _wait_for_status(client: TestClient, job_id: str, status: str, timeout: float = 15) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/job/{job_id}").json()
        return job if job["status"] == status else None

    return wait_until(reached, timeout, interval=0.05, what=f"job {job_id} to be {status}")


def test_email_goes_out_over_smtp_and_the_job_finishes(client: TestClient, smtp: MailSink, worker: object) -> None:
    job_id = client.post("/send-email", json=EMAIL).json()["job_id"]
    [message] = smtp.wait_for(1)
    assert (message["To"], message["Subject"], message.get_content().strip()) == ("ann@example.com", "Hi", "Welcome")
    assert message["Date"] is not None and message["Auto-Submitted"] == "auto-generated"
    job = _wait_for_status(client, job_id, "finished")
    assert job["result"] == {"to": "ann@example.com", "message_id": message["Message-ID"]}
    assert job["created_at"] <= job["enqueued_at"] <= job["started_at"] <= job["ended_at"]
    assert job["error"] is None and job["retries_left"] == 4


def test_every_email_of_a_batch_goes_out(client: TestClient, smtp: MailSink, worker: object) -> None:
    emails = [{**EMAIL, "to": f"user{n}@example.com"} for n in range(3)]
    jobs = client.post("/send-email/batch", json={"emails": emails}).json()["jobs"]
    assert sorted(message["To"] for message in smtp.wait_for(3)) == [email["to"] for email in emails]
    for job in jobs:
        _wait_for_status(client, job["job_id"], "finished")


def _record_attempts(sink: MailSink, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The time of every message the sink is offered, accepted or refused (`fail_next`)."""
    times: list[float] = []
    handle = sink.handle_DATA

    async def recorded(server: SMTP, session: Session, envelope: Envelope) -> str:
        times.append(time.monotonic())
        return await handle(server, session, envelope)

    monkeypatch.setattr(sink, "handle_DATA", recorded)  # before any session: aiosmtpd binds hooks per session
    return times


def test_transient_smtp_failures_are_retried_with_backoff_then_succeed(
    client: TestClient, smtp: MailSink, processes: StartProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backoff 2 s, then 4 s. RQ schedules retries in whole seconds and looks every second, so each gap
    is its delay less 1 s at most, plus up to 1 s: 1..3 s, then 3..5 s; a constant delay gives two alike."""
    monkeypatch.setenv("RETRY_BASE_SECONDS", "2")
    attempts = _record_attempts(smtp, monkeypatch)
    processes("worker.py", wait_for_workers=1)
    smtp.fail_next(2, "451 4.3.0 Mailbox busy")
    job_id = client.post("/send-email", json=EMAIL).json()["job_id"]
    smtp.wait_for(1, timeout=20)
    job = _wait_for_status(client, job_id, "finished")
    assert job["retries_left"] == 2
    first, second, third = attempts
    assert second - first >= 2 - 1 and third - second >= 4 - 1
    assert third - second > second - first, "the second delay is longer than the first"


def test_permanent_failure_is_not_retried_is_listed_and_can_be_requeued(
    client: TestClient, smtp: MailSink, worker: object
) -> None:
    smtp.fail_next(1, "550 5.1.1 No such user")
    job_id = client.post("/send-email", json=EMAIL).json()["job_id"]
    job = _wait_for_status(client, job_id, "failed")
    assert job["retries_left"] == 0
    assert job["error"] == {"type": "PermanentError", "message": "SMTP 550: 5.1.1 No such user"}
    failed = client.get("/jobs/failed").json()
    assert failed["total"] == 1 and failed["jobs"][0]["id"] == job_id
    assert smtp.messages == []

    response = client.post(f"/job/{job_id}/requeue")
    assert response.status_code == 202 and response.json()["retries_left"] == 4
    smtp.wait_for(1)
    assert _wait_for_status(client, job_id, "finished")["error"] is None
    assert client.get("/jobs/failed").json()["total"] == 0
    assert client.delete(f"/job/{job_id}").status_code == 409


def test_a_template_with_an_html_part_sends_text_and_escaped_html_as_alternatives(
    client: TestClient, smtp: MailSink, worker: object
) -> None:
    name = "<script>alert(1)</script> & Co"
    request = {
        "user_id": "ann", "channels": ["email"], "email": "ann@example.com",
        "template": "welcome", "context": {"name": name},
    }  # fmt: skip
    assert client.post("/notifications", json=request).status_code == 202
    [mail] = smtp.wait_for(1)
    assert mail.get_content_type() == "multipart/alternative"
    text, html = mail.iter_parts()
    assert (text.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert text.get_content().startswith(f"Hi {name},")
    assert "<p>Hi &lt;script&gt;alert(1)&lt;/script&gt; &amp; Co,</p>" in html.get_content()
    assert "<script>" not in html.get_content()
    assert mail["Subject"] == f"Welcome aboard, {name}"
    assert mail["Date"] is not None and mail["Auto-Submitted"] == "auto-generated"


def test_high_priority_is_served_before_default_and_low(
    client: TestClient, smtp: MailSink, processes: StartProcess, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One job at a time (WORKER_THREADS=1), so that the order they are taken in is the order they are sent:
    with threads, all five are taken at once and the sink gets them in the order they finish."""
    monkeypatch.setenv("WORKER_THREADS", "1")
    for n, priority in enumerate(["low", "low", "default", "low", "high"]):
        client.post("/send-email", json={**EMAIL, "subject": f"{priority}-{n}", "priority": priority})
    worker = processes("worker.py", "--burst")
    assert worker.wait(timeout=30) == 0
    assert [message["Subject"] for message in smtp.wait_for(5)] == ["high-4", "default-2", "low-0", "low-1", "low-3"]


def test_canceled_job_never_runs(client: TestClient, smtp: MailSink, processes: StartProcess) -> None:
    canceled = client.post("/send-email", json={**EMAIL, "subject": "canceled"}).json()["job_id"]
    kept = client.post("/send-email", json={**EMAIL, "subject": "kept"}).json()["job_id"]
    assert client.delete(f"/job/{canceled}").status_code == 200
    assert processes("worker.py", "--burst").wait(timeout=30) == 0
    assert _wait_for_status(client, kept, "finished")
    assert [message["Subject"] for message in smtp.messages] == ["kept"]
    assert client.get(f"/job/{canceled}").json()["status"] == "canceled"


def test_plain_rq_workers_never_leave_a_retry_stuck(
    client: TestClient, smtp: MailSink, processes: StartProcess, env: dict[str, str]
) -> None:
    """Only stock `rq worker`s consume; the project's scheduler process moves the retry on."""
    processes("rq", "worker", "--url", env["REDIS_URL"], "high", "default", "low", wait_for_workers=1)
    processes("scheduler.py")
    smtp.fail_next(1)
    job_id = client.post("/send-email", json=EMAIL).json()["job_id"]
    smtp.wait_for(1, timeout=20)
    assert _wait_for_status(client, job_id, "finished")["retries_left"] == 3


def _send(subject: str) -> None:
    settings = Settings()
    email.send(settings, email.build_message(settings, "ann@example.com", subject, "Welcome"))


def test_one_smtp_session_carries_the_messages_of_a_process_and_a_dropped_one_is_replaced(smtp: MailSink) -> None:
    try:
        _send("one")
        _send("two")
        assert len(smtp.peers) == 2 and smtp.peers[0] == smtp.peers[1]
        session = email._session.smtp
        assert session is not None and session.sock is not None
        session.sock.shutdown(socket.SHUT_RDWR)  # as when the server drops an idle client
        _send("three")
        assert [message["Subject"] for message in smtp.messages] == ["one", "two", "three"]
        assert smtp.peers[2] != smtp.peers[1]
    finally:
        email._close_session()


def test_a_session_idle_too_long_is_not_reused(smtp: MailSink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(email, "SESSION_IDLE_SECONDS", 0.0)
    try:
        _send("one")
        _send("two")
        assert len(set(smtp.peers)) == 2
    finally:
        email._close_session()


@pytest.mark.parametrize("html", [None, "<p>Welcome <b>back</b></p>"])
@pytest.mark.parametrize("subject", ["Hi", "Grüße aus Köln", "x" * 200])
def test_a_built_message_is_what_the_email_policy_writes(subject: str, html: str | None) -> None:
    settings = Settings()
    built = email.build_message(settings, "ann@example.com", subject, "Welcome\nback", unique_id="job-1", html=html)
    expected = EmailMessage()
    for name, value in (("From", settings.smtp_from), ("To", "ann@example.com"), ("Subject", subject)):
        expected[name] = value
    expected["Date"] = built["Date"]  # its value is checked in the next test
    expected["Message-ID"] = "<job-1@localhost>"
    expected["Auto-Submitted"] = "auto-generated"
    expected.set_content("Welcome\nback")
    if html is not None:
        expected.add_alternative(html, subtype="html")
    written = built.as_bytes()
    if html is not None:
        expected.set_boundary(str(built.get_boundary()))  # random, chosen while writing
    assert written == expected.as_bytes()


def test_every_message_is_dated_now_in_utc_and_marked_auto_generated() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    built = email.build_message(Settings(), "ann@example.com", "Hi", "Welcome")
    after = datetime.now(UTC)
    assert built["Date"] is not None, "RFC 5322 3.6: Date is required"
    date = parsedate_to_datetime(str(built["Date"]))
    assert before <= date <= after and date.utcoffset() == timedelta(0)
    assert re.fullmatch(r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000", str(built["Date"]))
    assert built["Auto-Submitted"] == "auto-generated"


def test_a_header_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="linefeed"):
        email.build_message(Settings(), "ann@example.com", "Hi\nBcc: eve@example.com", "x")
