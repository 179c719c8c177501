"""`GET /metrics`: jobs run by a real worker process, counted in Redis and scraped from the API."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from herald.infra import metrics
from herald.mailsink import MailSink
from settings import Settings
from tests.conftest import MakeClient
from tests.helpers import wait_until

EMAIL = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}
NOTE = {"user_id": "u42", "channels": ["email"], "email": "ann@example.com", "title": "Hi", "body": "Welcome"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_job(client: TestClient, job_id: str, status: str) -> None:
    wait_until(lambda: client.get(f"/job/{job_id}").json()["status"] == status, 20, what=f"job to be {status}")


def notify(client: TestClient) -> str:
    response = client.post("/notifications", json=NOTE)
    assert response.status_code == 202, response.text
    notification_id: str = response.json()["notification_id"]
    return notification_id


def wait_delivery(client: TestClient, notification_id: str, status: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        [delivery] = client.get(f"/notifications/{notification_id}").json()["deliveries"]
        return delivery if delivery["status"] == status else None

    return wait_until(reached, 20, what=f"delivery to be {status}")


def test_gauges_and_enqueue_counters_without_a_worker(client: TestClient, redis: Redis) -> None:
    for _ in range(2):
        assert client.post("/jobs", json={"task": "noop", "priority": "low"}).status_code == 202
    assert client.post("/jobs", json={"task": "noop", "delay_seconds": 60}).status_code == 202
    notify(client)
    samples = scrape(client)
    assert value(samples, "rq_queue_depth", queue="low") == 2
    assert value(samples, "rq_queue_depth", queue="default") == 1  # the notification's delivery
    assert value(samples, "rq_queue_depth", queue="high") == 0
    assert value(samples, "rq_delayed_jobs") == 1
    assert value(samples, "rq_workers_alive") == 0
    for registry in ("started", "scheduled", "failed"):
        assert (registry, value(samples, "rq_registry_size", queue="low", registry=registry)) == (registry, 0)
    assert value(samples, "rq_jobs_enqueued_total", task="noop") == 3
    assert value(samples, "rq_jobs_enqueued_total", task="deliver_email") == 1
    assert value(samples, "notification_created_total", channel="email") == 1


def test_jobs_and_deliveries_run_by_a_worker_are_counted(
    client: TestClient, smtp: MailSink, worker: object, monkeypatch: pytest.MonkeyPatch, make_client: MakeClient
) -> None:
    wait_job(client, client.post("/send-email", json=EMAIL).json()["job_id"], "finished")
    smtp.fail_next(1, "550 5.1.1 No such user")
    wait_job(client, client.post("/send-email", json=EMAIL).json()["job_id"], "failed")
    smtp.fail_next(1, "451 4.3.0 Mailbox busy")  # retried once (after about a second), then delivered
    delivered = wait_delivery(client, notify(client), "delivered")
    wait_job(client, delivered["job_id"], "finished")  # after the job's callbacks
    assert delivered["attempts"] == 2
    monkeypatch.setenv("EMAIL_MAX_ATTEMPTS", "1")
    client = make_client(Settings())  # the API with the new setting
    smtp.fail_next(1, "451 4.3.0 Mailbox busy")  # no attempt left: retries exhausted
    wait_job(client, wait_delivery(client, notify(client), "failed")["job_id"], "failed")

    samples = scrape(client)
    assert value(samples, "rq_jobs_enqueued_total", task="send_email") == 2
    assert value(samples, "rq_jobs_finished_total", task="send_email") == 1
    assert value(samples, "rq_jobs_failed_total", task="send_email") == 1
    assert value(samples, "rq_jobs_finished_total", task="deliver_email") == 1
    assert value(samples, "rq_jobs_retried_total", task="deliver_email") == 1
    assert value(samples, "rq_jobs_failed_total", task="deliver_email") == 1
    assert value(samples, "rq_job_duration_seconds_count", task="send_email") == 2
    assert value(samples, "rq_job_duration_seconds_bucket", task="send_email", le="+Inf") == 2
    assert value(samples, "rq_job_duration_seconds_sum", task="send_email") > 0
    assert value(samples, "rq_job_wait_seconds_count", queue="default") == 5  # one per attempt
    assert value(samples, "notification_created_total", channel="email") == 2
    assert value(samples, "notification_delivered_total", channel="email", status="delivered") == 1
    assert value(samples, "notification_delivered_total", channel="email", status="failed") == 1
    assert value(samples, "notification_retry_total", channel="email") == 1
    assert value(samples, "notification_retry_exhausted_total", channel="email") == 1
    assert value(samples, "rq_queue_depth", queue="default") == 0
    assert value(samples, "rq_registry_size", queue="default", registry="failed") == 2
    assert value(samples, "rq_workers_alive") == 1


def test_canceled_deliveries_and_rejections_are_counted(
    client: TestClient, redis: Redis, monkeypatch: pytest.MonkeyPatch, make_client: MakeClient
) -> None:
    notification_id = notify(client)
    assert client.delete(f"/notifications/{notification_id}").status_code == 200
    monkeypatch.setenv("QUEUE_MAX_WAITING", "1")
    client = make_client(Settings())  # the API with the new setting
    assert client.post("/jobs", json={"task": "noop", "priority": "high"}).status_code == 202
    assert client.post("/jobs", json={"task": "noop", "priority": "high"}).status_code == 429
    samples = scrape(client)
    assert value(samples, "notification_delivered_total", channel="email", status="canceled") == 1
    assert value(samples, "queue_rejected_total", queue="high") == 1
    assert value(samples, "rq_jobs_enqueued_total", task="noop") == 1
    assert value(samples, "rq_queue_depth", queue="default") == 0


def test_histogram_buckets_are_cumulative(redis: Redis) -> None:
    for seconds in (0.003, 0.2, 0.2, 7200.0):
        metrics.JOB_DURATION.observe(redis, seconds, "noop")
    [family] = [f for f in metrics.RedisCollector(redis).collect() if f.name == "rq_job_duration_seconds"]
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert (buckets["0.005"], buckets["0.1"], buckets["0.25"], buckets["600.0"], buckets["+Inf"]) == (1, 1, 3, 3, 4)
    [total] = [s.value for s in family.samples if s.name.endswith("_sum")]
    assert total == pytest.approx(7200.403)


def test_metrics_answer_503_when_redis_is_unavailable(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, refused_redis_url: str
) -> None:
    monkeypatch.setenv("REDIS_URL", refused_redis_url)
    response = client.get("/metrics")
    assert response.status_code == 503 and "detail" in response.json()
