"""Structured logs: JSON lines with the job's context, from a real worker process, and never a secret."""

from __future__ import annotations

import base64
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue

import metrics
import queues
from logs import REDACTED, setup_logging
from mailsink import MailSink
from settings import get_settings
from tests.helpers import ROOT, stop_process, wait_until
from tests.receiver import Receiver

WEBHOOK_KEY = base64.b64encode(b"webhook-key-Jm4Kp9").decode()
SECRETS = {
    "SMTP_PASSWORD": "smtp-pw-Qx7Zr2",
    "WEBHOOK_SECRET": f"whsec_{WEBHOOK_KEY}",
    "API_KEYS": "api-key-Vb8Nw3,api-key-Tc5Hy6",
    "DASHBOARD_PASSWORD": "dash-pw-Lf2Gs8",
}
SECRET_VALUES = [*SECRETS.values(), WEBHOOK_KEY, "api-key-Vb8Nw3", "api-key-Tc5Hy6"]
REQUIRED = {"ts", "level", "logger", "message"}


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Iterator[None]:
    """The secrets in this process's settings and in those of the processes it starts."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the process's logging back as it was after a test that sets it up."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def assert_no_secret(text: str) -> None:
    leaked = [secret for secret in SECRET_VALUES if secret in text]
    assert not leaked, f"secrets leaked: {leaked}"


def wait_job(client: TestClient, job_id: str, status: str) -> None:
    wait_until(lambda: client.get(f"/job/{job_id}").json()["status"] == status, 20, what=f"job to be {status}")


def parse_lines(output: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert entries and all(entry.keys() >= REQUIRED for entry in entries)
    return entries


def test_log_lines_are_json_with_secrets_redacted(
    secrets: None, root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO")
    log = logging.getLogger("test")
    log.debug("below the level: not written")
    log.info("login with %s", SECRETS["SMTP_PASSWORD"], extra={"delivery_id": "d1", "error": SECRETS["API_KEYS"]})
    try:
        raise ValueError(f"bad key {WEBHOOK_KEY} for {SECRETS['DASHBOARD_PASSWORD']}")
    except ValueError:
        log.exception("failed with api-key-Tc5Hy6")
    output = capsys.readouterr().err
    assert_no_secret(output)
    first, second = parse_lines(output)
    assert (first["level"], first["logger"], first["delivery_id"]) == ("INFO", "test", "d1")
    assert first["message"] == f"login with {REDACTED}" and first["error"] == f"{REDACTED},{REDACTED}"
    assert second["level"] == "ERROR" and second["message"] == f"failed with {REDACTED}"
    assert f"ValueError: bad key {REDACTED} for {REDACTED}" in second["exc_info"]


def test_the_single_api_key_is_redacted_too(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("API_KEY", "solo-key-Wd3Pn8")
    get_settings.cache_clear()
    setup_logging("INFO")
    logging.getLogger("test").warning("refused solo-key-Wd3Pn8")
    [entry] = parse_lines(capsys.readouterr().err)
    assert entry["message"] == f"refused {REDACTED}"


@pytest.fixture
def worker_output(secrets: None, redis: Redis, smtp: MailSink, webhooks: Receiver) -> Iterator[Path]:
    """A project worker with the secrets set; its stdout and stderr go to the file yielded."""
    with tempfile.TemporaryDirectory(prefix="worker-logs-") as folder:
        path = Path(folder) / "worker.log"
        with path.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "worker.py"], cwd=ROOT, env=dict(os.environ), stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            wait_until(lambda: metrics.alive_workers(redis), what="worker to register")
            yield path
        finally:
            stop_process(process)


def test_worker_logs_each_delivery_outcome_as_json_without_secrets(
    worker_output: Path, client: TestClient, smtp: MailSink, webhooks: Receiver, redis: Redis
) -> None:
    client.headers["X-API-Key"] = "api-key-Tc5Hy6"
    smtp.fail_next(1, "451 4.3.0 Mailbox busy")  # email: retrying, then delivered
    webhooks.fail_next(1, 410)  # webhook: failed for good
    note = {"user_id": "u42", "title": "Hi", "body": "Welcome", "channels": ["email", "webhook", "in_app"]}
    note |= {"email": "ann@example.com", "webhook_url": f"{webhooks.url}/hooks"}
    response = client.post("/notifications", json=note, headers={"X-Request-ID": "req-logs-1"})
    assert response.status_code == 202, response.text
    deliveries = {d["channel"]: d["delivery_id"] for d in response.json()["deliveries"]}
    email_job = client.post("/send-email", json={"to": "bob@example.com", "subject": "Hi", "body": "Welcome"})
    # A job whose error message holds a secret: RQ logs its traceback from the work-horse.
    low = Queue("low", connection=redis)
    leaky = low.enqueue_job(
        low.create_job(importlib.import_module, args=(SECRETS["SMTP_PASSWORD"],), **queues.job_options(None))
    )
    expected = {deliveries["email"]: "finished", deliveries["webhook"]: "failed", deliveries["in_app"]: "finished"}
    expected |= {email_job.json()["job_id"]: "finished", leaky.id: "failed"}
    for job_id, status in expected.items():
        wait_job(client, job_id, status)

    answers = [client.get(f"/job/{job_id}").text for job_id in expected if job_id != leaky.id]
    answers += [client.get(f"/notifications/{response.json()['notification_id']}").text, client.get("/metrics").text]
    assert_no_secret("\n".join(answers))
    output = worker_output.read_text()
    assert_no_secret(output)
    entries = parse_lines(output)
    assert any(REDACTED in entry["message"] and entry.get("job_id") == leaky.id for entry in entries)
    outcomes = {(e["channel"], e["outcome"]): e for e in entries if e.get("logger") == "tasks" and "outcome" in e}
    assert set(outcomes) == {
        ("email", "retrying"),
        ("email", "delivered"),
        ("webhook", "failed"),
        ("in_app", "delivered"),
    }
    for (channel, outcome), entry in outcomes.items():
        assert entry["delivery_id"] == entry["job_id"] == deliveries[channel]
        assert (entry["correlation_id"], entry["task"], entry["queue"]) == (
            "req-logs-1",
            f"deliver_{channel}",
            "default",
        )
        assert entry["attempt"] == (2 if (channel, outcome) == ("email", "delivered") else 1)
        assert entry["level"] == {"retrying": "WARNING", "failed": "ERROR"}.get(outcome, "INFO")
    assert outcomes[("webhook", "failed")]["error"].startswith("PermanentError: ")
