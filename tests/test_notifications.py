"""Notifications end to end: API, real Redis, worker processes, SMTP server and webhook receiver."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job

from herald.api import idempotency
from herald.infra import keys
from herald.mailsink import MailSink
from settings import DEFAULT_WEBHOOK_SECRET
from tests.conftest import StartProcess
from tests.helpers import wait_until
from tests.receiver import Receiver, verify_signature

NOTE = {"user_id": "u42", "title": "Order shipped", "body": "Your parcel is on its way."}


def _notify(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/notifications", json={**NOTE, **fields})
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _delivery(client: TestClient, notification_id: str, channel: str) -> dict[str, Any]:
    view = client.get(f"/notifications/{notification_id}").json()
    delivery: dict[str, Any] = next(d for d in view["deliveries"] if d["channel"] == channel)
    return delivery


def _wait_status(
    client: TestClient, notification_id: str, channel: str, status: str, timeout: float = 20
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        delivery = _delivery(client, notification_id, channel)
        return delivery if delivery["status"] == status else None

    return wait_until(reached, timeout, interval=0.05, what=f"{channel} delivery to be {status}")


def test_each_channel_delivers_with_its_own_record(
    client: TestClient, smtp: MailSink, webhooks: Receiver, worker: object, redis: Redis
) -> None:
    answer = _notify(
        client,
        channels=["email", "webhook", "in_app"],
        email="ann@example.com",
        webhook_url=f"{webhooks.url}/hooks",
        priority="urgent",
        source_entity_type="order",
        source_entity_id="o-17",
    )
    assert {d["channel"] for d in answer["deliveries"]} == {"email", "webhook", "in_app"}
    assert all(d["job_id"] == d["delivery_id"] and d["status"] == "pending" for d in answer["deliveries"])
    notification_id = answer["notification_id"]
    for channel in ("email", "webhook", "in_app"):
        delivery = _wait_status(client, notification_id, channel, "delivered")
        assert (delivery["attempts"], delivery["last_error"]) == (1, None)
    [mail] = smtp.messages
    assert (mail["To"], mail["Subject"]) == ("ann@example.com", "Order shipped")
    [hook] = webhooks.requests
    assert verify_signature(DEFAULT_WEBHOOK_SECRET, hook.headers, hook.body)
    payload = json.loads(hook.body)
    assert payload["data"]["notification_id"] == notification_id
    assert payload["data"]["source_entity"] == {"type": "order", "id": "o-17"}
    inbox = client.get("/users/u42/notifications").json()
    assert [item["id"] for item in inbox["items"]] == [notification_id] and inbox["unread"] == 1
    assert client.get(answer["status_url"]).json()["priority"] == "urgent"


def _job_correlation_id(redis: Redis, answer: dict[str, Any]) -> str:
    correlation: str = Job.fetch(answer["deliveries"][0]["job_id"], connection=redis).meta["correlation_id"]
    return correlation


def test_correlation_id_is_returned_and_carried_into_the_job(client: TestClient, redis: Redis) -> None:
    body = {**NOTE, "channels": ["in_app"]}
    response = client.post("/notifications", json=body, headers={"X-Request-ID": "req-123"})
    assert response.headers["X-Request-ID"] == "req-123" and response.json()["correlation_id"] == "req-123"
    assert _job_correlation_id(redis, response.json()) == "req-123"
    for malformed in ("has spaces", "x" * 129, "<script>", "a/b"):
        replaced = client.post("/notifications", json=body, headers={"X-Request-ID": malformed})
        generated = replaced.headers["X-Request-ID"]
        assert re.fullmatch("[0-9a-f]{32}", generated), (malformed, generated)
        assert replaced.json()["correlation_id"] == _job_correlation_id(redis, replaced.json()) == generated
    absent = client.post("/notifications", json=body)
    assert re.fullmatch("[0-9a-f]{32}", absent.headers["X-Request-ID"])
    assert _job_correlation_id(redis, absent.json()) == absent.headers["X-Request-ID"]


def test_transient_webhook_failures_retry_on_schedule_then_succeed(
    client: TestClient, webhooks: Receiver, processes: StartProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backoff 2 s, then 4 s. RQ schedules retries in whole seconds and looks every second, so each gap
    is its delay less 1 s at most, plus up to 1 s: 1..3 s, then 3..5 s; a constant delay gives two alike."""
    monkeypatch.setenv("RETRY_BASE_SECONDS", "2")
    processes("worker.py", wait_for_workers=1)
    webhooks.fail_next(2, 503)
    answer = _notify(client, channels=["webhook"], webhook_url=webhooks.url)
    retrying = _wait_status(client, answer["notification_id"], "webhook", "retrying")
    assert retrying["error_category"] == "transient" and "503" in retrying["last_error"]
    assert retrying["next_retry_at"] is not None
    delivered = _wait_status(client, answer["notification_id"], "webhook", "delivered")
    assert delivered["attempts"] == 3
    first, second, third = (request.received_at for request in webhooks.wait_for(3))
    assert second - first >= 2 - 1 and third - second >= 4 - 1
    assert third - second > second - first, "the second delay is longer than the first"
    assert {request.headers["webhook-id"] for request in webhooks.requests} == {delivered["delivery_id"]}


def test_permanent_failure_stops_at_once_and_manual_retry_sends_it(
    client: TestClient, webhooks: Receiver, worker: object
) -> None:
    webhooks.fail_next(1, 410)
    answer = _notify(client, channels=["webhook"], webhook_url=webhooks.url)
    notification_id = answer["notification_id"]
    failed = _wait_status(client, notification_id, "webhook", "failed")
    assert (failed["attempts"], failed["error_category"]) == (1, "permanent")
    # The record says failed before RQ, after the job's callbacks, moves the job to its failed registry.
    failed_jobs = wait_until(lambda: client.get("/jobs/failed").json()["jobs"], what="job in the failed registry")
    assert failed_jobs[0]["id"] == failed["job_id"]
    response = client.post(f"/notifications/{notification_id}/deliveries/webhook/retry")
    assert response.status_code == 202
    _wait_status(client, notification_id, "webhook", "delivered")
    assert len(webhooks.requests) == 2
    assert client.post(f"/notifications/{notification_id}/deliveries/webhook/retry").status_code == 409


def test_expired_delivery_is_never_sent(client: TestClient, smtp: MailSink, processes: StartProcess) -> None:
    expires = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    answer = _notify(client, channels=["email"], email="ann@example.com", expires_at=expires)
    wait_until(lambda: datetime.now(UTC) > datetime.fromisoformat(expires), timeout=3, what="expiry")
    processes("worker.py", "--burst").wait(timeout=30)
    assert _delivery(client, answer["notification_id"], "email")["status"] == "expired"
    assert smtp.messages == []


def test_a_delivery_its_job_already_sent_is_recorded_delivered_and_not_sent_again(
    client: TestClient, smtp: MailSink, webhooks: Receiver, redis: Redis, processes: StartProcess
) -> None:
    """A re-run of a delivery job whose first run sent and died before recording it (the `sent:`
    marker is there) sends nothing and records the delivery as delivered."""
    answer = _notify(client, channels=["email", "webhook"], email="ann@example.com", webhook_url=f"{webhooks.url}/h")
    email, webhook = (_delivery(client, answer["notification_id"], channel) for channel in ("email", "webhook"))
    redis.set(keys.sent(email["delivery_id"]), "delivered")
    redis.set(keys.sent(webhook["delivery_id"]), "delivered")
    processes("worker.py", "--burst").wait(timeout=30)
    for channel in ("email", "webhook"):
        delivery = _delivery(client, answer["notification_id"], channel)
        assert (delivery["status"], delivery["attempts"]) == ("delivered", 1), channel
    assert smtp.messages == [] and webhooks.requests == []


def test_a_canceled_notification_is_never_sent_and_a_delayed_one_is_sent_when_due(
    client: TestClient, smtp: MailSink, processes: StartProcess
) -> None:
    processes("scheduler.py")
    processes("worker.py", wait_for_workers=1)
    both = {"channels": ["email", "in_app"], "email": "ann@example.com"}
    canceled = _notify(client, **both, title="canceled", delay_seconds=1)
    kept = _notify(client, **both, title="kept", delay_seconds=2)  # due after the canceled one
    assert {d["status"] for d in kept["deliveries"]} == {"scheduled"}
    view = client.delete(canceled["status_url"]).json()
    assert {d["status"] for d in view["deliveries"]} == {"canceled"}
    scheduled = client.get("/jobs/scheduled").json()
    assert {job["id"] for job in scheduled["jobs"]} == {d["job_id"] for d in kept["deliveries"]}

    for channel in ("email", "in_app"):  # the kept one, once due: the canceled one's time has passed
        delivered = _wait_status(client, kept["notification_id"], channel, "delivered")
        due = client.get(kept["status_url"]).json()["scheduled_for"]
        assert delivered["delivered_at"] >= due, "never before its time"
    assert [mail["Subject"] for mail in smtp.messages] == ["kept"]
    inbox = client.get("/users/u42/notifications").json()
    assert [item["id"] for item in inbox["items"]] == [kept["notification_id"]]
    assert {d["status"] for d in client.get(canceled["status_url"]).json()["deliveries"]} == {"canceled"}


def test_priority_picks_the_queue_and_each_channel_has_its_attempts(
    client: TestClient, redis: Redis, webhooks: Receiver
) -> None:
    """README: urgent and high -> high, normal (the default) -> default, low -> low; email and webhook
    5 attempts, in-app 1."""
    targets = {"channels": ["email", "webhook", "in_app"], "email": "ann@example.com", "webhook_url": webhooks.url}
    expected = {"urgent": "high", "high": "high", "normal": "default", "low": "low", None: "default"}
    for priority, queue in expected.items():
        answer = _notify(client, **targets, **({"priority": priority} if priority else {}))
        deliveries = client.get(answer["status_url"]).json()["deliveries"]
        attempts = {d["channel"]: d["max_attempts"] for d in deliveries}
        assert attempts == {"email": 5, "webhook": 5, "in_app": 1}
        for delivery in deliveries:
            job = client.get(f"/job/{delivery['job_id']}").json()
            assert job["queue"] == queue, (priority, delivery["channel"])
            assert (job["retries_left"] or 0) == attempts[delivery["channel"]] - 1, (priority, delivery["channel"])


def test_a_manual_retry_gets_a_fresh_attempt_budget(
    client: TestClient, webhooks: Receiver, processes: StartProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBHOOK_MAX_ATTEMPTS", "2")
    processes("worker.py", wait_for_workers=1)
    webhooks.fail_next(3, 503)  # both attempts of the budget, then the first of the fresh one
    answer = _notify(client, channels=["webhook"], webhook_url=webhooks.url)
    notification_id = answer["notification_id"]
    failed = _wait_status(client, notification_id, "webhook", "failed")
    assert (failed["attempts"], failed["max_attempts"], failed["error_category"]) == (2, 2, "transient")
    wait_until(lambda: client.get(f"/job/{failed['job_id']}").json()["status"] == "failed", what="job failed")

    retried = client.post(f"/notifications/{notification_id}/deliveries/webhook/retry")
    assert retried.status_code == 202
    [delivery] = retried.json()["deliveries"]
    assert (delivery["status"], delivery["attempts"]) == ("pending", 0)
    delivered = _wait_status(client, notification_id, "webhook", "delivered")
    assert delivered["attempts"] == 2, "failed once more, then delivered on its second fresh attempt"
    assert len(webhooks.wait_for(4)) == 4


def test_idempotency_key_returns_the_first_answer_and_refuses_another_body(client: TestClient, redis: Redis) -> None:
    headers = {"Idempotency-Key": "order-17-shipped"}
    body = {**NOTE, "channels": ["in_app"]}
    first = client.post("/notifications", json=body, headers=headers)
    again = client.post("/notifications", json=body, headers=headers)
    assert first.status_code == again.status_code == 202 and first.json() == again.json()
    assert len(redis.keys("notification:*")) == 1
    other = client.post("/notifications", json={**body, "title": "Changed"}, headers=headers)
    assert other.status_code == 409 and "different request body" in other.json()["detail"]
    mail = {"to": "ann@example.com", "subject": "Hi", "body": "x"}
    sent = [client.post("/send-email", json=mail, headers=headers).json() for _ in range(2)]
    assert sent[0] == sent[1] and len(redis.lrange("rq:queue:default", 0, -1)) == 2  # 1 notification + 1 mail


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/notifications", {**NOTE, "channels": ["in_app"]}),
        ("/send-email", {"to": "ann@example.com", "subject": "Hi", "body": "x"}),
    ],
)
def test_two_simultaneous_requests_with_one_key_create_one_job(
    client: TestClient, redis: Redis, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any]
) -> None:
    """Both requests are held until both are about to claim the key, then race for it."""
    both_claiming = threading.Barrier(2, timeout=5)
    claim = idempotency.claim

    def claim_together(*args: Any) -> dict[str, Any] | None:
        both_claiming.wait()
        return claim(*args)

    monkeypatch.setattr(idempotency, "claim", claim_together)
    headers = {"Idempotency-Key": "order-17-concurrent"}
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda _: client.post(path, json=body, headers=headers), range(2)))

    assert len(redis.keys("rq:job:*")) == 1
    codes = sorted(response.status_code for response in responses)
    assert codes in ([202, 202], [202, 409]), [response.text for response in responses]
    if codes == [202, 202]:  # the first had answered when the second read the key
        assert responses[0].json() == responses[1].json()
    else:
        assert "still being processed" in next(r for r in responses if r.status_code == 409).json()["detail"]


def test_request_errors_are_422_before_anything_is_written(client: TestClient, redis: Redis) -> None:
    cases = [
        ({**NOTE, "channels": ["email"]}, "no email"),
        ({**NOTE, "channels": ["webhook"], "webhook_url": "http://169.254.169.254/latest/meta-data"}, "refused"),
        ({**NOTE, "channels": ["webhook"], "webhook_url": "http://127.0.0.1:9/x"}, "refused"),
        ({"user_id": "u1", "channels": ["in_app"], "template": "welcome"}, "name"),
        ({"user_id": "u1", "channels": ["in_app"], "template": "nope"}, "unknown template"),
        ({**NOTE, "channels": ["sms"]}, "channels"),
        ({**NOTE, "channels": []}, "channels"),
        ({"user_id": "u1", "channels": ["in_app"]}, "title and body"),
    ]
    for body, message in cases:
        response = client.post("/notifications", json=body)
        assert response.status_code == 422, (body, response.text)
        assert message in json.dumps(response.json()), (body, response.json())
    assert redis.keys("notification:*") == [] and redis.keys("rq:job:*") == []


def test_template_renders_per_channel_and_stored_contact_is_used(
    client: TestClient, smtp: MailSink, webhooks: Receiver, worker: object
) -> None:
    contact = {"email": "bo@example.com", "webhook_url": webhooks.url}
    assert client.put("/users/bo/contact", json=contact).status_code == 200
    request = {"user_id": "bo", "channels": ["email", "webhook"], "template": "welcome", "context": {"name": "Bo"}}
    answer = client.post("/notifications", json=request).json()
    _wait_status(client, answer["notification_id"], "webhook", "delivered")
    [mail] = smtp.wait_for(1)
    assert mail["To"] == "bo@example.com" and "Bo" in mail["Subject"]
    payload = json.loads(webhooks.requests[0].body)["data"]
    assert (payload["event"], payload["name"]) == ("user.welcome", "Bo")


# One name for the recipient: `to`, as in POST /send-email; `email` stays accepted as its old name


def _email_target(redis: Redis, answer: dict[str, Any]) -> str:
    [delivery] = [d for d in answer["deliveries"] if d["channel"] == "email"]
    message = json.loads(redis.hget(f"delivery:{delivery['delivery_id']}", "message"))  # type: ignore[arg-type]
    target: str = message["target"]
    return target


def test_notifications_take_to_as_send_email_does_and_email_still_works(client: TestClient, redis: Redis) -> None:
    assert _email_target(redis, _notify(client, channels=["email"], to="ann@example.com")) == "ann@example.com"
    assert _email_target(redis, _notify(client, channels=["email"], email="bo@example.com")) == "bo@example.com"
    same = _notify(client, channels=["email"], to="cy@example.com", email="cy@example.com")
    assert _email_target(redis, same) == "cy@example.com"


def test_to_and_a_different_email_are_422_saying_why(client: TestClient, redis: Redis) -> None:
    body = {**NOTE, "channels": ["email"], "to": "ann@example.com", "email": "bo@example.com"}
    response = client.post("/notifications", json=body)
    assert response.status_code == 422
    assert "to and email" in json.dumps(response.json())
    assert client.put("/users/u42/contact", json={"to": "a@example.com", "email": "b@example.com"}).status_code == 422
    assert redis.keys("notification:*") == [] and redis.keys("user:*") == []


def test_contact_takes_to_shows_to_and_is_used(client: TestClient, redis: Redis) -> None:
    saved = client.put("/users/bo/contact", json={"to": "bo@example.com"})
    assert saved.status_code == 200
    assert saved.json() == {"to": "bo@example.com", "webhook_url": None, "email": "bo@example.com"}
    assert client.get("/users/bo/contact").json() == saved.json()
    assert client.get("/users/nobody/contact").status_code == 404
    old_name = client.put("/users/cy/contact", json={"email": "cy@example.com"})
    assert old_name.status_code == 200 and old_name.json()["to"] == "cy@example.com"
    assert _email_target(redis, _notify(client, user_id="bo", channels=["email"])) == "bo@example.com"


def test_openapi_names_the_recipient_to(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("NotificationRequest", "UserContact"):
        assert "to" in schemas[name]["properties"] and "email" not in schemas[name]["properties"], name


def test_an_attempt_is_counted_on_the_record_and_a_gone_record_is_not_made_again(redis: Redis) -> None:
    from herald.notify import notifications

    record = {"delivery_id": "d1", "attempts": 2, "status": "retrying"}
    redis.hset(keys.delivery("d1"), mapping=notifications.encode(record))
    assert notifications.start_attempt(redis, record) == 3
    loaded = notifications.load_delivery(redis, "d1")
    assert loaded is not None and (loaded["attempts"], loaded["status"]) == (3, "sending")
    gone = {"delivery_id": "d2", "attempts": 0}
    assert notifications.start_attempt(redis, gone) == 1
    assert not redis.exists(keys.delivery("d2"))


def test_a_message_lua_cannot_read_still_has_its_users_preferences_obeyed(redis: Redis) -> None:
    """`load_for_send` reads a user's preferences inside Redis, decoding the message with Lua's cjson,
    which refuses some of what Python's json takes (a lone surrogate's escape); then they are read in Python."""
    import tasks
    from herald.notify import notifications, preferences

    message = {"user_id": "u7", "topic": "general", "required": False, "data": "\ud800"}
    redis.hset(keys.delivery("d7"), mapping=notifications.encode({"delivery_id": "d7", "message": message}))
    redis.hset(preferences.key("u7"), "channel:email", "false")
    read = notifications.load_for_send(redis, "d7", keys.sent("d7"))

    assert read.delivery is not None and read.preferences is None, "left to Python"
    wanted = tasks._preferences(redis, read.delivery, read.preferences)
    assert tasks._skip_reason({**read.delivery, "channel": "email"}, wanted) == preferences.OPTED_OUT
    assert read.sent is False
