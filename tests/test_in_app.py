"""The in-app channel against the test Redis: inbox storage, its HTTP routes, live WebSocket pushes."""

from __future__ import annotations

import contextlib
import functools
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from herald import mailsink
from herald.exceptions import PermanentError
from herald.notify.channels import in_app
from herald.notify.channels.base import Message
from settings import Settings
from tests import inbox_app
from tests.conftest import StartProcess
from tests.helpers import wait_until


def message(number: int, user_id: str = "ann", **fields: Any) -> Message:
    values: dict[str, Any] = {
        "delivery_id": f"d{number}",
        "notification_id": f"n{number}",
        "user_id": user_id,
        "title": f"Title {number}",
        "body": f"Body {number}",
        "created_at": f"2026-01-01T00:00:{number:02d}+00:00",
        "payload": {"order": number},
        **fields,
    }
    return Message(**values)


def item(number: int, read: bool = False) -> dict[str, Any]:
    return {**in_app.item_of(message(number)), "read": read}


@pytest.fixture
def inbox(redis: Redis) -> Iterator[TestClient]:
    """The inbox routes alone (`tests.inbox_app`), on the test Redis."""
    with TestClient(inbox_app.create(Settings()), raise_server_exceptions=False) as test_client:
        yield test_client


def page(inbox: TestClient, user_id: str = "ann", **query: Any) -> dict[str, Any]:
    response = inbox.get(f"/users/{user_id}/notifications", params=query)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_newest_first_with_counts(inbox: TestClient) -> None:
    for number in (1, 2, 3):
        in_app.send(Settings(), message(number))
    assert page(inbox) == {"total": 3, "unread": 3, "offset": 0, "limit": 50, "items": [item(3), item(2), item(1)]}
    assert page(inbox, "bob") == {"total": 0, "unread": 0, "offset": 0, "limit": 50, "items": []}


def test_pagination(inbox: TestClient) -> None:
    for number in range(1, 6):
        in_app.send(Settings(), message(number))
    assert [entry["id"] for entry in page(inbox, offset=1, limit=2)["items"]] == ["n4", "n3"]
    last = page(inbox, offset=4, limit=2)
    assert (last["total"], [entry["id"] for entry in last["items"]]) == (5, ["n1"])
    assert page(inbox, offset=5)["items"] == []


def test_mark_read_and_unread_filter(inbox: TestClient) -> None:
    for number in (1, 2, 3):
        in_app.send(Settings(), message(number))
    response = inbox.post("/users/ann/notifications/n2/read")
    assert response.status_code == 200 and response.json() == item(2, read=True)
    assert inbox.post("/users/ann/notifications/n2/read").json() == item(2, read=True)  # again: same answer
    everything = page(inbox)
    assert (everything["total"], everything["unread"]) == (3, 2)
    assert [entry["read"] for entry in everything["items"]] == [False, True, False]
    unread = page(inbox, unread="true")
    assert (unread["total"], unread["unread"]) == (2, 2)
    assert unread["items"] == [item(3), item(1)]


def test_unknown_notification_is_404(inbox: TestClient) -> None:
    in_app.send(Settings(), message(1))
    for path in ("/users/ann/notifications/n9/read", "/users/bob/notifications/n1/read"):
        response = inbox.post(path)
        assert response.status_code == 404 and "detail" in response.json()
    assert page(inbox)["unread"] == 1


def test_inbox_keeps_the_newest_and_drops_the_data_of_older_ones(
    inbox: TestClient, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INBOX_SIZE", "3")
    for number in range(1, 6):
        in_app.send(Settings(), message(number))
    inbox.post("/users/ann/notifications/n4/read")
    in_app.send(Settings(), message(6))
    listed = page(inbox)
    assert ([entry["id"] for entry in listed["items"]], listed["total"], listed["unread"]) == (["n6", "n5", "n4"], 3, 2)
    assert sorted(redis.hkeys("inbox:{ann}:items")) == [b"n4", b"n5", b"n6"]
    assert sorted(redis.zrange("inbox:{ann}:unread", 0, -1)) == [b"n5", b"n6"]
    assert inbox.post("/users/ann/notifications/n1/read").status_code == 404


def test_send_is_idempotent_per_notification(inbox: TestClient, redis: Redis) -> None:
    in_app.send(Settings(), message(1))
    inbox.post("/users/ann/notifications/n1/read")
    in_app.send(Settings(), message(2))
    in_app.send(Settings(), message(1))  # a retried delivery: neither a second item, nor unread again, nor moved up
    in_app.send(Settings(), message(1, title="changed"))
    assert page(inbox)["items"] == [item(2), item(1, read=True)]
    assert redis.zcard("inbox:{ann}:ids") == 2


@pytest.mark.parametrize("user_id", ["a!b", "a%20b", "x" * 129, "caf%C3%A9"])
def test_invalid_user_id_is_422(inbox: TestClient, user_id: str) -> None:
    assert inbox.get(f"/users/{user_id}/notifications").status_code == 422
    assert inbox.post(f"/users/{user_id}/notifications/n1/read").status_code == 422


def test_invalid_query_is_422(inbox: TestClient) -> None:
    for query in ({"limit": 201}, {"limit": 0}, {"offset": -1}, {"unread": "maybe"}):
        assert inbox.get("/users/ann/notifications", params=query).status_code == 422


def test_send_refuses_an_invalid_user_id_for_good(redis: Redis) -> None:
    with pytest.raises(PermanentError):
        in_app.send(Settings(), message(1, user_id="no spaces"))
    assert redis.keys("inbox:*") == []


def test_websocket_closes_1008_on_invalid_user_id(inbox: TestClient) -> None:
    with inbox.websocket_connect("/ws/users/a!b") as websocket, pytest.raises(WebSocketDisconnect) as closed:
        websocket.receive_text()
    assert closed.value.code == 1008


def test_websocket_closes_1013_without_redis(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{mailsink.free_port()}/0")  # nothing listens there
    inbox = TestClient(inbox_app.create(Settings()), raise_server_exceptions=False)
    with inbox, inbox.websocket_connect("/ws/users/ann") as websocket, pytest.raises(WebSocketDisconnect) as closed:
        websocket.receive_text()
    assert closed.value.code == 1013


def subscribers(redis: Redis, user_id: str) -> int:
    channel = in_app.channel_name(user_id)
    return int(dict(redis.pubsub_numsub(channel))[channel.encode()])


def url(port: int, user_id: str) -> str:
    return f"ws://127.0.0.1:{port}/ws/users/{user_id}"


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_websocket_pushes_new_items_from_any_process(processes: StartProcess, redis: Redis) -> None:
    ports = [mailsink.free_port(), mailsink.free_port()]
    servers = [
        processes("uvicorn", "tests.inbox_app:app", "--port", str(port), "--log-level", "warning") for port in ports
    ]
    for port in ports:
        wait_until(functools.partial(listening, port), timeout=20, what=f"the API on port {port}")
    with contextlib.ExitStack() as stack:
        ann_a, ann_b, bob_a = (
            stack.enter_context(connect(url(port, user), open_timeout=5, close_timeout=2))
            for port, user in ((ports[0], "ann"), (ports[1], "ann"), (ports[0], "bob"))
        )
        wait_until(lambda: subscribers(redis, "ann") >= 2 and subscribers(redis, "bob") >= 1, what="subscriptions")
        in_app.send(Settings(), message(1))  # as a worker would: from another process than both servers
        in_app.send(Settings(), message(2, user_id="bob"))
        assert json.loads(ann_a.recv(timeout=5)) == item(1)
        assert json.loads(ann_b.recv(timeout=5)) == item(1)
        received = json.loads(bob_a.recv(timeout=5))  # bob's first frame is his own item: none of ann's
        assert (received["id"], received["title"]) == ("n2", "Title 2")
        redis.client_kill_filter(_type="pubsub")  # a dropped connection: the servers re-subscribe
        wait_until(lambda: subscribers(redis, "ann") >= 2, what="subscriptions to come back")
        in_app.send(Settings(), message(3))
        assert [json.loads(websocket.recv(timeout=5))["id"] for websocket in (ann_a, ann_b)] == ["n3", "n3"]
        refused = stack.enter_context(connect(url(ports[1], "a!b"), open_timeout=5))
        with pytest.raises(ConnectionClosed) as closed:
            refused.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    wait_until(lambda: subscribers(redis, "ann") + subscribers(redis, "bob") == 0, what="subscriptions to end")
    assert all(server.poll() is None for server in servers)
