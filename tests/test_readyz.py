"""`GET /readyz`: ready when Redis answers and a worker has a live heartbeat; `/healthz` stays liveness."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from redis import Redis


def test_not_ready_without_a_worker_though_alive(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "no worker" in response.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_a_worker_that_stopped_heartbeating_does_not_count(client: TestClient, redis: Redis) -> None:
    redis.sadd("rq:workers", "rq:worker:gone")  # still listed, but its heartbeat key has expired
    assert client.get("/readyz").status_code == 503


def test_ready_with_a_worker(client: TestClient, worker: object) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "redis": "ok", "workers": 1}


def test_not_ready_when_redis_does_not_answer(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, refused_redis_url: str
) -> None:
    monkeypatch.setenv("REDIS_URL", refused_redis_url)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"detail": "Redis does not answer: ConnectionError"}
