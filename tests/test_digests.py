"""Digests: the API (in-process and two uvicorn processes), real Redis, worker and scheduler processes,
and the SMTP sink."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any
from zoneinfo import ZoneInfo

import httpx2
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.exceptions import WatchError

from herald import mailsink
from herald.mailsink import MailSink
from herald.notify import digests, dispatch
from settings import Settings
from tests.conftest import StartProcess
from tests.helpers import wait_for_http, wait_until
from tests.test_metrics import scrape, value

NOTE = {"user_id": "ann", "channels": ["email"], "to": "ann@example.com", "title": "T", "body": "B"}


def _notify(client: TestClient | httpx2.Client, key: str = "orders", window: int = 3, **fields: Any) -> dict[str, Any]:
    body = {**NOTE, "digest_key": key, "digest_window_seconds": window, **fields}
    response = client.post("/notifications", json=body)
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _digest_id(answer: dict[str, Any], channel: str = "email") -> str:
    [delivery] = [d for d in answer["deliveries"] if d["channel"] == channel]
    assert delivery["status"] == "digested", delivery
    return str(delivery["digest_delivery_id"])


def _digest(client: TestClient | httpx2.Client, digest_id: str) -> dict[str, Any]:
    response = client.get(f"/digests/{digest_id}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def _settled(client: TestClient | httpx2.Client, digest_id: str, status: str = "delivered") -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        view = _digest(client, digest_id)
        return view if view["delivery"]["status"] == status else None

    return wait_until(reached, 60, interval=0.1, what=f"digest {digest_id} to be {status}")


def _delivery(client: TestClient, notification_id: str, channel: str = "email") -> dict[str, Any]:
    view = client.get(f"/notifications/{notification_id}").json()
    [delivery] = [d for d in view["deliveries"] if d["channel"] == channel]
    return dict(delivery)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _text(mail: EmailMessage) -> str:
    part = mail.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


@pytest.fixture
def stack(processes: StartProcess, smtp: MailSink) -> MailSink:
    """A scheduler (moves due digests onto their queue) and a worker (sends them) on the test Redis."""
    processes("scheduler.py")
    processes("worker.py", wait_for_workers=1)
    return smtp


# The request


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"digest_key": "orders"}, "give digest_key and digest_window_seconds together"),
        ({"digest_window_seconds": 60}, "give digest_key and digest_window_seconds together"),
        ({"digest_key": "orders", "digest_window_seconds": 0}, "greater than or equal to 1"),
        ({"digest_key": "orders", "digest_window_seconds": 86_401}, "less than or equal to 86400"),
        ({"digest_key": "a b", "digest_window_seconds": 60}, "pattern"),
        ({"digest_key": "orders", "digest_window_seconds": 60, "delay_seconds": 5}, "no delay_seconds or send_at"),
        ({"digest_key": "orders", "digest_window_seconds": 60, "priority": "urgent"}, "cannot be digested"),
    ],
)
def test_bad_digest_fields_are_422_saying_why_and_store_nothing(
    client: TestClient, redis: Redis, fields: dict[str, Any], message: str
) -> None:
    response = client.post("/notifications", json={**NOTE, **fields})
    assert response.status_code == 422
    assert message in json.dumps(response.json()), response.json()
    assert redis.keys("digest*") == [] and redis.keys("notification:*") == []


def test_the_window_bounds_are_accepted_and_the_answer_says_when_the_digest_goes(
    client: TestClient, redis: Redis
) -> None:
    before = datetime.now(UTC)
    [day] = _notify(client, key="daily", window=86_400)["deliveries"]
    assert (
        before + timedelta(days=1)
        <= datetime.fromisoformat(day["scheduled_for"])
        <= datetime.now(UTC) + timedelta(days=1)
    )
    [second] = _notify(client, key="quick", window=1)["deliveries"]
    assert second["status"] == "digested" and second["digest_delivery_id"] != day["digest_delivery_id"]
    assert client.get(f"/digests/{'0' * 32}").status_code == 404
    assert client.get("/digests/not-an-id").status_code == 422


def test_a_digest_that_keeps_changing_is_a_503_that_stores_nothing(
    client: TestClient, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always_changed(*args: Any) -> None:
        raise WatchError("watched key changed")

    monkeypatch.setattr(digests, "_add_once", always_changed)
    response = client.post("/notifications", json={**NOTE, "digest_key": "orders", "digest_window_seconds": 5})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert "kept changing" in response.json()["detail"]
    assert redis.keys("notification:*") == []


# One message per window


def test_notifications_within_a_window_go_out_as_one_message_per_channel_and_key(
    client: TestClient, stack: MailSink
) -> None:
    orders = [
        _notify(client, channels=["email", "in_app"], title=f"Order {n} shipped", body=f"Parcel {n}") for n in (1, 2, 3)
    ]
    news = _notify(client, key="news", title="News", body="Something new")
    email_digest, in_app_digest = _digest_id(orders[0]), _digest_id(orders[0], "in_app")
    assert {_digest_id(answer) for answer in orders} == {email_digest}
    assert {_digest_id(answer, "in_app") for answer in orders} == {in_app_digest}
    assert len({email_digest, in_app_digest, _digest_id(news)}) == 3
    ids = [answer["notification_id"] for answer in orders]
    waiting = _digest(client, email_digest)
    assert (waiting["status"], waiting["notification_ids"], waiting["delivery"]["status"]) == ("open", ids, "scheduled")
    assert (waiting["user_id"], waiting["channel"], waiting["digest_key"]) == ("ann", "email", "orders")

    sent = _settled(client, email_digest)
    assert (sent["status"], sent["sent_notification_ids"]) == ("closed", ids)
    assert datetime.fromisoformat(sent["delivery"]["delivered_at"]) >= datetime.fromisoformat(sent["window_ends_at"])
    mails = {mail["Subject"]: mail for mail in stack.wait_for(2)}
    assert set(mails) == {"3 new notifications", "1 new notification"}
    text = _text(mails["3 new notifications"])
    positions = [text.index(f"Order {n} shipped\nParcel {n}") for n in (1, 2, 3)]
    assert positions == sorted(positions)
    assert mails["3 new notifications"]["To"] == "ann@example.com"
    assert "<strong>Order 2 shipped</strong>" in str(mails["3 new notifications"].get_body(("html",)))
    assert "News\nSomething new" in _text(mails["1 new notification"])
    for notification_id in ids:
        delivery = _delivery(client, notification_id)
        assert (delivery["status"], delivery["digest_delivery_id"]) == ("digested", email_digest)

    _settled(client, in_app_digest)
    [item] = client.get("/users/ann/notifications").json()["items"]
    assert (item["id"], item["title"]) == (in_app_digest, "3 new notifications")
    samples = scrape(client)
    assert value(samples, "notification_delivered_total", channel="email", status="digested") == 4
    assert value(samples, "notification_delivered_total", channel="email", status="delivered") == 2


# Several API processes


def _api(processes: StartProcess) -> list[str]:
    """Two uvicorn processes of the app on the test Redis."""
    urls = []
    for port in (mailsink.free_port(), mailsink.free_port()):
        processes("uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning")
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_for_http(f"{url}/healthz")
    return urls


@pytest.fixture
def apis(stack: MailSink, processes: StartProcess) -> Iterator[list[httpx2.Client]]:
    clients = [httpx2.Client(base_url=url, timeout=30) for url in _api(processes)]
    yield clients
    for client in clients:
        client.close()


def test_concurrent_requests_through_two_api_processes_share_one_window(
    apis: list[httpx2.Client], stack: MailSink, client: TestClient
) -> None:
    """Bursts of simultaneous first notifications for new keys, half through each process: each key
    gets one digest with every notification."""
    threads, keys = 8, [f"burst-{n}" for n in range(15)]
    start = threading.Barrier(threads)

    def post(n: int) -> tuple[str, dict[str, Any]]:
        key = keys[n // threads]
        start.wait(timeout=30)  # the burst's requests leave together
        return key, _notify(apis[n % 2], key=key, window=4, title=f"Item {n}", body=f"Body {n}")

    with ThreadPoolExecutor(threads) as pool:
        posted = list(pool.map(post, range(threads * len(keys))))
    digest_of = {key: {_digest_id(answer) for k, answer in posted if k == key} for key in keys}
    assert all(len(ids) == 1 for ids in digest_of.values()), digest_of
    for key, (digest_id,) in digest_of.items():
        sent = _settled(apis[0], digest_id)
        assert sorted(sent["sent_notification_ids"]) == sorted(a["notification_id"] for k, a in posted if k == key)
    mails = stack.wait_for(len(keys))
    assert {mail["Subject"] for mail in mails} == {f"{threads} new notifications"}
    text = "".join(_text(mail) for mail in mails)
    assert all(text.count(f"Item {n}\nBody {n}\n") == 1 for n in range(threads * len(keys)))


def test_notifications_arriving_as_windows_close_are_each_sent_once(
    apis: list[httpx2.Client], stack: MailSink, client: TestClient, redis: Redis
) -> None:
    """One-second windows, notifications sent across several of their ends from two processes: each
    one is in exactly one digest, and one window is open at a time."""
    deadline = datetime.now(UTC) + timedelta(seconds=4)

    def post_until_deadline(worker: int) -> list[tuple[str, dict[str, Any]]]:
        posted, n = [], 0
        while datetime.now(UTC) < deadline:
            title = f"Item {worker}-{n}"
            posted.append((title, _notify(apis[worker % 2], window=1, title=title, body="B")))
            n += 1
        return posted

    with ThreadPoolExecutor(4) as pool:
        posted = [pair for batch in pool.map(post_until_deadline, range(4)) for pair in batch]
    answers = [answer for _, answer in posted]
    digest_ids = {_digest_id(answer) for answer in answers}
    assert len(digest_ids) >= 3  # the posts spanned several windows
    views = [_settled(apis[0], digest_id) for digest_id in digest_ids]
    sent = [nid for view in views for nid in view["sent_notification_ids"]]
    assert sorted(sent) == sorted(answer["notification_id"] for answer in answers)  # each once
    for answer in answers:
        assert answer["notification_id"] in _digest(client, _digest_id(answer))["sent_notification_ids"]
    windows = sorted((_time(view["opened_at"]), _time(view["window_ends_at"])) for view in views)
    assert all(ends <= next_opened for (_, ends), (next_opened, _) in itertools.pairwise(windows))  # one at a time
    mails = [_listed(_text(mail)) for mail in stack.wait_for(len(digest_ids))]
    titles = [title for _, listed, _ in mails for title in listed]
    assert len(set(titles)) == len(titles) and set(titles) <= {title for title, _ in posted}
    assert all(len(listed) + more == count for count, listed, more in mails)
    assert sum(count for count, _, _ in mails) == len(posted)
    assert redis.keys("digest:open:*") == []  # every window closed


def _listed(text: str) -> tuple[int, list[str], int]:
    """A digest email's count of items, the titles it lists (titles start with "Item "), and how many more it counts."""
    lines = text.splitlines()
    more = lines[-1].removeprefix("… and ").removesuffix(" more") if lines[-1].startswith("… and ") else "0"
    return int(lines[0].split()[0]), [line for line in lines if line.startswith("Item ")], int(more)


def test_a_digest_too_long_for_one_message_lists_its_first_items_and_counts_the_others(
    stack: MailSink, client: TestClient
) -> None:
    """Each part of a message is bounded (`rendering.MAX_PART_BYTES`); 150 items of 2,000 characters exceed it."""
    answers = [_notify(client, window=5, title=f"Item {n}", body="x" * 2_000) for n in range(150)]
    [digest_id] = {_digest_id(answer) for answer in answers}
    view = _settled(client, digest_id)

    [mail] = stack.wait_for(1)
    count, listed, more = _listed(_text(mail))
    assert count == 150 and 0 < len(listed) < 150 and len(listed) + more == 150
    assert listed == [f"Item {n}" for n in range(len(listed))]  # the first ones, in arrival order
    assert len(view["sent_notification_ids"]) == 150


def test_a_notification_reading_a_digest_as_it_closes_opens_the_next_one(
    client: TestClient, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close runs between the join's read of the open digest and its EXEC: the join is retried
    and opens a new digest, and the closed one never gets the item."""
    first = _digest_id(_notify(client, window=60, title="First"))
    found = digests._open_digest
    closed: list[str] = []

    def close_after_reading(*args: Any) -> tuple[str, str] | None:
        seen = found(*args)
        if seen is not None and not closed:  # as a worker would, on a connection of its own
            closed.append(seen[0])
            digests.close(redis, digests._load(redis, seen[0]) or {})
        return seen

    monkeypatch.setattr(digests, "_open_digest", close_after_reading)
    second = _notify(client, window=60, title="Second")
    assert closed == [first]
    assert _digest_id(second) != first
    assert [item["title"] for item in digests.close(redis, digests._load(redis, first) or {})] == ["First"]
    assert _digest(client, _digest_id(second))["notification_ids"] == [second["notification_id"]]
    assert _digest(client, first)["status"] == "closed"


# What changes during a window


def test_an_opt_out_during_the_window_leaves_those_items_out_and_an_empty_digest_is_skipped(
    client: TestClient, stack: MailSink
) -> None:
    sale = _notify(client, title="Sale", body="20% off", topic="marketing")
    order = _notify(client, title="Order shipped", body="On its way", topic="orders")
    promo = _notify(client, key="promo", title="Promo", body="Buy now", topic="marketing")
    response = client.put("/users/ann/preferences", json={"topics": {"marketing": {"email": False}}})
    assert response.status_code == 200
    sent = _settled(client, _digest_id(order))
    assert sent["sent_notification_ids"] == [order["notification_id"]]
    skipped = _settled(client, _digest_id(promo), "skipped")
    assert (skipped["sent_notification_ids"], skipped["delivery"]["skip_reason"]) == ([], "opted_out")
    [mail] = stack.wait_for(1)
    assert mail["Subject"] == "1 new notification" and "Sale" not in _text(mail)
    for answer in (sale, promo):
        delivery = _delivery(client, answer["notification_id"])
        assert (delivery["status"], delivery["skip_reason"]) == ("skipped", "opted_out")
    token = mail["List-Unsubscribe"].strip("<>").rpartition("/")[2]
    assert tuple(dispatch.read_unsubscribe_token(Settings(), token) or ()) == (
        "ann",
        "orders",
        "email",
    )  # the one topic sent


def test_a_canceled_opening_notification_leaves_the_digest_and_the_others_are_sent(
    client: TestClient, stack: MailSink
) -> None:
    opening = _notify(client, title="First", body="one")
    second = _notify(client, title="Second", body="two")
    short_lived = _notify(
        client, title="Third", body="three", expires_at=(datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    )
    canceled = client.delete(f"/notifications/{opening['notification_id']}").json()
    [delivery] = canceled["deliveries"]
    assert (delivery["status"], delivery["digest_delivery_id"]) == ("canceled", _digest_id(opening))
    sent = _settled(client, _digest_id(opening))
    assert sent["notification_ids"] == [a["notification_id"] for a in (opening, second, short_lived)]
    assert sent["sent_notification_ids"] == [second["notification_id"]]
    [mail] = stack.wait_for(1)
    assert mail["Subject"] == "1 new notification" and "First" not in _text(mail) and "Second\ntwo" in _text(mail)
    assert _delivery(client, short_lived["notification_id"])["status"] == "expired"
    after = client.delete(f"/notifications/{second['notification_id']}").json()["deliveries"][0]
    assert after["status"] == "digested"  # sent already: nothing to cancel
    samples = scrape(client)
    assert value(samples, "notification_delivered_total", channel="email", status="canceled") == 1
    assert value(samples, "notification_delivered_total", channel="email", status="expired") == 1


def test_a_window_ending_in_quiet_hours_stays_open_until_they_end(
    client: TestClient, smtp: MailSink, processes: StartProcess
) -> None:
    zone = ZoneInfo("Asia/Tokyo")
    local_now = datetime.now(zone).replace(microsecond=0)
    quiet_end = local_now + timedelta(seconds=6)
    quiet = {"start": (local_now - timedelta(hours=1)).strftime("%H:%M:%S"), "end": quiet_end.strftime("%H:%M:%S")}
    response = client.put("/users/ann/preferences", json={"quiet_hours": {**quiet, "timezone": "Asia/Tokyo"}})
    assert response.status_code == 200
    first = _notify(client, window=1, title="First", body="one")
    assert datetime.fromisoformat(first["deliveries"][0]["scheduled_for"]) == quiet_end
    opened = datetime.fromisoformat(_digest(client, _digest_id(first))["opened_at"])
    wait_until(lambda: datetime.now(UTC) > opened + timedelta(seconds=2), what="the window's own end to pass")
    late = _notify(client, window=1, title="Late", body="two")
    assert _digest_id(late) == _digest_id(first)
    processes("scheduler.py")
    processes("worker.py", wait_for_workers=1)
    sent = _settled(client, _digest_id(first))
    assert datetime.fromisoformat(sent["delivery"]["delivered_at"]) >= quiet_end  # never early
    [mail] = smtp.wait_for(1)
    assert mail["Subject"] == "2 new notifications"
