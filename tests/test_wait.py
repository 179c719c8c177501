"""REDIS_WAIT_REPLICAS: work is answered 202 only once that many replicas have it, else 503.

A real primary and one replica (valkey-server, loopback); the app in-process. Asking for two
replicas of a primary that has one makes every WAIT come short, deterministically.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from herald import mailsink
from settings import Settings
from tests.conftest import MakeClient
from tests.replication import ReplicaSet

EMAIL = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}
ACCEPTING: list[tuple[str, dict[str, Any]]] = [
    ("/send-email", EMAIL),
    ("/send-email/batch", {"emails": [EMAIL, EMAIL]}),
    ("/jobs", {"task": "noop"}),
    ("/notifications", {"user_id": "ann", "title": "Hi", "body": "Welcome", "channels": ["in_app"]}),
]


@pytest.fixture(scope="module")
def replicated() -> Iterator[ReplicaSet]:
    with tempfile.TemporaryDirectory(prefix="test-wait-") as folder:
        nodes = ReplicaSet(Path(folder), "127.0.0.1", [mailsink.free_port() for _ in range(2)], replicas=1, sentinels=0)
        try:
            yield nodes.start()
        finally:
            nodes.stop()


def app_waiting_for(
    monkeypatch: pytest.MonkeyPatch, nodes: ReplicaSet, replicas: int, **settings: str
) -> Iterator[TestClient]:
    for name, value in {"REDIS_URL": nodes.direct_url, "REDIS_WAIT_REPLICAS": str(replicas), **settings}.items():
        monkeypatch.setenv(name, value)
    try:
        with TestClient(__import__("app").create_app(Settings()), raise_server_exceptions=False) as client:
            yield client
    finally:
        with Redis.from_url(nodes.direct_url) as primary:
            primary.flushdb()


@pytest.fixture
def one_replica(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], replicated: ReplicaSet) -> Iterator[TestClient]:
    """WAIT answers as soon as the replica has the writes: a long timeout costs nothing here, and keeps a
    loaded machine's slow replica from turning the 202 into a 503."""
    yield from app_waiting_for(monkeypatch, replicated, 1, REDIS_WAIT_TIMEOUT_MS="3000", REDIS_SOCKET_TIMEOUT="5")


@pytest.fixture
def two_replicas(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], replicated: ReplicaSet) -> Iterator[TestClient]:
    yield from app_waiting_for(monkeypatch, replicated, 2)


@pytest.mark.parametrize(("path", "body"), ACCEPTING)
def test_work_that_replicas_confirm_is_accepted(one_replica: TestClient, path: str, body: dict[str, Any]) -> None:
    response = one_replica.post(path, json=body)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(("path", "body"), ACCEPTING)
def test_work_too_few_replicas_confirm_is_refused_with_503_saying_a_retry_is_safe(
    two_replicas: TestClient, path: str, body: dict[str, Any]
) -> None:
    response = two_replicas.post(path, json=body)
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert "1 of 2 Redis replicas" in response.json()["detail"]
    assert "may exist" in response.json()["detail"] and "Idempotency-Key" in response.json()["detail"]


def waiting_for(monkeypatch: pytest.MonkeyPatch, make_client: MakeClient, replicas: int) -> TestClient:
    """The same API, now waiting for `replicas` replicas."""
    monkeypatch.setenv("REDIS_WAIT_REPLICAS", str(replicas))
    return make_client(Settings())


def test_a_cancel_waits_for_replicas_too(
    monkeypatch: pytest.MonkeyPatch, one_replica: TestClient, make_client: MakeClient
) -> None:
    job_id = one_replica.post("/jobs", json={"task": "noop", "delay_seconds": 60}).json()["job_id"]
    assert waiting_for(monkeypatch, make_client, 2).delete(f"/job/{job_id}").status_code == 503


def test_a_retry_with_the_same_idempotency_key_is_answered_once_replicas_have_it(
    monkeypatch: pytest.MonkeyPatch, two_replicas: TestClient, replicated: ReplicaSet, make_client: MakeClient
) -> None:
    headers = {"Idempotency-Key": "order-7"}
    refused = two_replicas.post("/send-email", json=EMAIL, headers=headers)
    assert refused.status_code == 503
    with Redis.from_url(replicated.direct_url) as primary:
        jobs_before = primary.keys("rq:job:*")
    retried = waiting_for(monkeypatch, make_client, 1).post("/send-email", json=EMAIL, headers=headers)
    assert retried.status_code == 202, retried.text
    with Redis.from_url(replicated.direct_url) as primary:
        assert primary.keys("rq:job:*") == jobs_before  # the first request's job, not a second one
        assert primary.exists(f"rq:job:{retried.json()['job_id']}")
