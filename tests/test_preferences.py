"""Preferences per user, topic and channel, and quiet hours: the API, real Redis, worker and scheduler
processes, and the SMTP sink."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from herald.mailsink import MailSink
from tests.conftest import StartProcess
from tests.helpers import wait_until
from tests.test_metrics import scrape, value

EVERYTHING_ON = {"email": True, "webhook": True, "in_app": True}
EXAMPLE = {
    "channels": {"email": True, "webhook": True, "in_app": True},
    "topics": {"marketing": {"email": False}},
    "quiet_hours": {"start": "22:00", "end": "07:00", "timezone": "Europe/Berlin"},
}
NOTE = {"user_id": "ann", "title": "News", "body": "Something new", "to": "ann@example.com"}


def _put(client: TestClient, user: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.put(f"/users/{user}/preferences", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _notify(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/notifications", json={**NOTE, **fields})
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _by_channel(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {delivery["channel"]: delivery for delivery in answer["deliveries"]}


def _wait_status(client: TestClient, notification_id: str, channel: str, status: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        view = client.get(f"/notifications/{notification_id}").json()
        delivery: dict[str, Any] = _by_channel(view)[channel]
        return delivery if delivery["status"] == status else None

    return wait_until(reached, 30, interval=0.05, what=f"{channel} delivery to be {status}")


# The routes


def test_a_new_user_has_every_channel_on_and_no_quiet_hours(client: TestClient) -> None:
    defaults = {"channels": EVERYTHING_ON, "topics": {}, "quiet_hours": None}
    assert client.get("/users/nobody/preferences").json() == defaults


def test_put_stores_the_preferences_and_get_returns_them(client: TestClient) -> None:
    assert _put(client, "ann", EXAMPLE) == EXAMPLE
    assert client.get("/users/ann/preferences").json() == EXAMPLE
    partial = _put(client, "ann", {"topics": {"news": {"webhook": False}}})
    assert partial == {"channels": EVERYTHING_ON, "topics": {"news": {"webhook": False}}, "quiet_hours": None}
    assert client.get("/users/ann/preferences").json() == partial
    assert _put(client, "ann", {"channels": {"in_app": False}})["channels"] == {**EVERYTHING_ON, "in_app": False}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"channels": {"sms": False}}, "'email', 'webhook' or 'in_app'"),
        ({"topics": {"marketing": {"pager": False}}}, "'email', 'webhook' or 'in_app'"),
        ({"topics": {"bad:topic": {"email": False}}}, "pattern"),
        ({"channels": {"email": "maybe"}}, "boolean"),
        ({"topics": {"news": {"email": 0}}}, "boolean"),
        ({"quiet_hours": {**EXAMPLE["quiet_hours"], "start": "24:00"}}, "pattern"),  # type: ignore[dict-item]
        ({"quiet_hours": {**EXAMPLE["quiet_hours"], "end": "7:00"}}, "pattern"),  # type: ignore[dict-item]
        ({"quiet_hours": {**EXAMPLE["quiet_hours"], "end": "07:00+01:00"}}, "pattern"),  # type: ignore[dict-item]
        ({"quiet_hours": {**EXAMPLE["quiet_hours"], "timezone": "Mars/Olympus"}}, "unknown time zone"),  # type: ignore[dict-item]
        ({"quiet_hours": {"start": "22:00", "end": "07:00"}}, "timezone"),
        ({"mute": True}, "Extra inputs are not permitted"),
    ],
)
def test_bad_preferences_are_422_saying_why_and_change_nothing(
    client: TestClient, redis: Redis, body: dict[str, Any], message: str
) -> None:
    _put(client, "ann", EXAMPLE)
    response = client.put("/users/ann/preferences", json=body)
    assert response.status_code == 422
    assert message in json.dumps(response.json()), response.json()
    assert client.get("/users/ann/preferences").json() == EXAMPLE


def test_bad_user_ids_are_422(client: TestClient) -> None:
    assert client.put("/users/a%20b/preferences", json={}).status_code == 422
    assert client.get("/users/a:b/preferences").status_code == 422


def test_notifications_take_topic_and_required_and_refuse_bad_topics(client: TestClient, redis: Redis) -> None:
    answer = _notify(client, channels=["in_app"])
    view = client.get(answer["status_url"]).json()
    assert (view["topic"], view["required"]) == ("general", False)
    view = client.get(_notify(client, channels=["in_app"], topic="security", required=True)["status_url"]).json()
    assert (view["topic"], view["required"]) == ("security", True)
    assert client.post("/notifications", json={**NOTE, "channels": ["in_app"], "topic": "a b"}).status_code == 422


# Opt-outs


def test_opted_out_channels_are_skipped_and_the_others_sent(
    client: TestClient, smtp: MailSink, worker: object, redis: Redis
) -> None:
    _put(client, "ann", {"topics": {"marketing": {"email": False}}})
    answer = _notify(client, channels=["email", "in_app"], topic="marketing")
    email, in_app = _by_channel(answer)["email"], _by_channel(answer)["in_app"]
    assert (email["status"], email["skip_reason"]) == ("skipped", "opted_out")
    assert (in_app["status"], in_app["skip_reason"]) == ("pending", None)
    assert not redis.exists(f"rq:job:{email['job_id']}")  # no job: nothing will ever send it
    _wait_status(client, answer["notification_id"], "in_app", "delivered")
    assert _by_channel(client.get(answer["status_url"]).json())["email"]["skip_reason"] == "opted_out"
    other_topic = _notify(client, channels=["email"], topic="orders")
    _wait_status(client, other_topic["notification_id"], "email", "delivered")
    [mail] = smtp.wait_for(1)
    assert mail["Subject"] == "News"
    assert value(scrape(client), "notification_delivered_total", channel="email", status="skipped") == 1


def test_a_channel_turned_off_is_skipped_for_every_topic(client: TestClient, redis: Redis) -> None:
    _put(client, "ann", {"channels": {"email": False}, "topics": {"marketing": {"email": True}}})
    for topic in ("general", "marketing"):
        [email] = _notify(client, channels=["email"], topic=topic)["deliveries"]
        assert (email["status"], email["skip_reason"]) == ("skipped", "opted_out"), topic


def test_required_notifications_ignore_opt_outs(client: TestClient, smtp: MailSink, worker: object) -> None:
    _put(client, "ann", {"channels": {"email": False}, "topics": {"security": {"email": False}}})
    answer = _notify(client, channels=["email"], topic="security", required=True)
    assert answer["deliveries"][0]["status"] == "pending"
    _wait_status(client, answer["notification_id"], "email", "delivered")
    [mail] = smtp.wait_for(1)
    assert mail["List-Unsubscribe"] is None and mail["List-Unsubscribe-Post"] is None


def test_an_opt_out_made_while_a_delivery_waits_is_obeyed_when_it_is_due(
    client: TestClient, smtp: MailSink, processes: StartProcess
) -> None:
    processes("scheduler.py")
    processes("worker.py", wait_for_workers=1)
    answer = _notify(client, channels=["email", "in_app"], topic="marketing", delay_seconds=2)
    assert {d["status"] for d in answer["deliveries"]} == {"scheduled"}
    _put(client, "ann", {"topics": {"marketing": {"email": False}}})
    _wait_status(client, answer["notification_id"], "in_app", "delivered")  # the jobs ran
    skipped = _wait_status(client, answer["notification_id"], "email", "skipped")
    assert (skipped["skip_reason"], skipped["attempts"]) == ("opted_out", 0)
    assert smtp.messages == []
    assert value(scrape(client), "notification_delivered_total", channel="email", status="skipped") == 1


# Quiet hours


def _hms(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S")


def test_quiet_hours_hold_a_delivery_until_they_end_and_urgent_goes_at_once(
    client: TestClient, smtp: MailSink, processes: StartProcess, redis: Redis
) -> None:
    """A window that started an hour ago in Tokyo and ends in a few seconds, to the second."""
    zone = ZoneInfo("Asia/Tokyo")
    local_now = datetime.now(zone).replace(microsecond=0)
    window = {"start": _hms(local_now - timedelta(hours=1)), "end": _hms(local_now + timedelta(seconds=4))}
    _put(client, "ann", {"quiet_hours": {**window, "timezone": "Asia/Tokyo"}})
    expected_end = (local_now + timedelta(seconds=4)).astimezone(UTC)
    urgent = _by_channel(_notify(client, channels=["email"], priority="urgent", title="Urgent"))["email"]
    assert (urgent["status"], urgent["scheduled_for"]) == ("pending", None)
    assert client.get(f"/job/{urgent['job_id']}").json()["queue"] == "high"
    answer = _notify(client, channels=["email", "in_app"], title="Later")
    for delivery in answer["deliveries"]:
        assert delivery["status"] == "scheduled"
        assert datetime.fromisoformat(delivery["scheduled_for"]) == expected_end
    assert datetime.fromisoformat(client.get(answer["status_url"]).json()["scheduled_for"]) == expected_end
    processes("scheduler.py")
    processes("worker.py", wait_for_workers=1)
    delivered = _wait_status(client, answer["notification_id"], "email", "delivered")
    assert datetime.fromisoformat(delivered["delivered_at"]) >= expected_end  # never early
    assert datetime.fromisoformat(delivered["scheduled_for"]) == expected_end
    assert {mail["Subject"] for mail in smtp.wait_for(2)} == {"Urgent", "Later"}


def _last_sunday(year: int, month: int) -> date:
    day = date(year, month, 31)
    return day - timedelta(days=(day.weekday() + 1) % 7)


def _next_berlin_change(month: int) -> date:
    """The next last Sunday of March (spring forward) or October (fall back) at least a day away."""
    year = datetime.now(UTC).year
    while _last_sunday(year, month) <= datetime.now(UTC).date() + timedelta(days=1):
        year += 1
    return _last_sunday(year, month)


@pytest.mark.parametrize(
    ("month", "offset", "end_utc"),
    [(3, "+01:00", "05:00"), (10, "+02:00", "06:00")],
    ids=["spring-forward", "fall-back"],
)
def test_a_send_at_inside_quiet_hours_waits_for_the_morning_across_a_dst_change(
    client: TestClient, redis: Redis, monkeypatch: pytest.MonkeyPatch, month: int, offset: str, end_utc: str
) -> None:
    """22:00 to 07:00 in Berlin: due at 00:30 on the night the clocks change, held until 07:00 local,
    05:00 UTC after springing forward, 06:00 UTC after falling back."""
    monkeypatch.setenv("SCHEDULE_HORIZON_DAYS", "400")
    _put(client, "ann", {"quiet_hours": EXAMPLE["quiet_hours"]})
    night = _next_berlin_change(month)
    send_at = f"{night.isoformat()}T00:30:00{offset}"
    [held] = _notify(client, channels=["in_app"], send_at=send_at)["deliveries"]
    assert held["status"] == "scheduled"
    assert datetime.fromisoformat(held["scheduled_for"]) == datetime.fromisoformat(f"{night}T{end_utc}:00+00:00")
    [job] = client.get("/jobs/scheduled").json()["jobs"]
    assert (job["id"], job["scheduled_for"]) == (held["job_id"], held["scheduled_for"])
    [urgent] = _notify(client, channels=["in_app"], send_at=send_at, priority="urgent")["deliveries"]
    assert datetime.fromisoformat(urgent["scheduled_for"]) == datetime.fromisoformat(send_at)
    outside = f"{night.isoformat()}T12:00:00+00:00"  # 13:00 or 14:00 in Berlin
    [daytime] = _notify(client, channels=["in_app"], send_at=outside)["deliveries"]
    assert datetime.fromisoformat(daytime["scheduled_for"]) == datetime.fromisoformat(outside)


def test_a_window_whose_start_equals_its_end_holds_nothing(client: TestClient, redis: Redis) -> None:
    now = datetime.now(ZoneInfo("Europe/Berlin"))
    same = now.strftime("%H:%M")
    _put(client, "ann", {"quiet_hours": {"start": same, "end": same, "timezone": "Europe/Berlin"}})
    [delivery] = _notify(client, channels=["in_app"])["deliveries"]
    assert delivery["status"] == "pending"
