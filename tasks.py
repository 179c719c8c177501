"""The job functions and the registry clients pick them from by name.

Only functions in `TASKS` can be enqueued through the API; a name from a request is
looked up here and never handed to RQ, which would import any dotted path it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from rq import get_current_job
from rq.job import Job

import notifications
from channels import CHANNELS, Message, email
from exceptions import PermanentError
from schemas import EmailArgs, NoArgs
from settings import get_settings


def send_email(to: str, subject: str, body: str) -> dict[str, str]:
    """Send one email over SMTP and return its Message-ID."""
    settings = get_settings()
    message = email.build_message(settings, to, subject, body)
    email.send(settings, message)
    return {"to": to, "message_id": str(message["Message-ID"])}


def deliver_notification(delivery_id: str) -> dict[str, str]:
    """Make one channel delivery of a notification, keeping its record up to date.

    Not in `TASKS`: clients create deliveries through `POST /notifications` only. A transient
    error is re-raised for RQ to retry with backoff; a permanent one stops the retries.
    """
    job = get_current_job()
    assert job is not None, "runs as an RQ job"
    connection = job.connection
    delivery = notifications.load_delivery(connection, delivery_id)
    if delivery is None:
        raise PermanentError(f"delivery {delivery_id} has no record (expired or deleted)")
    if delivery["status"] == "canceled":
        return {"status": "canceled"}
    if delivery["expires_at"] and datetime.fromisoformat(delivery["expires_at"]) <= datetime.now(UTC):
        notifications.update(connection, delivery_id, status="expired")
        return {"status": "expired"}
    notifications.start_attempt(connection, delivery_id)
    try:
        CHANNELS[delivery["channel"]](Message(**delivery["message"]))
    except Exception as exc:
        _record_failure(job, delivery_id, exc)
        raise
    notifications.update(connection, delivery_id, status="delivered", delivered_at=notifications.now_iso())
    return {"status": "delivered"}


def _record_failure(job: Job, delivery_id: str, exc: Exception) -> None:
    permanent = isinstance(exc, PermanentError)
    retrying = not permanent and bool(job.retries_left)
    next_retry = datetime.now(UTC) + timedelta(seconds=job.get_retry_interval()) if retrying else None
    notifications.update(
        job.connection,
        delivery_id,
        status="retrying" if retrying else "failed",
        last_error=f"{type(exc).__name__}: {exc}",
        error_category="permanent" if permanent else "transient",
        next_retry_at=next_retry.isoformat() if next_retry else None,
    )


def noop() -> None:
    """Do nothing: a cheap job for health checks and benchmarks."""


@dataclass(frozen=True)
class Task:
    func: Callable[..., Any]
    args: type[BaseModel]
    description: str


TASKS: dict[str, Task] = {
    "send_email": Task(send_email, EmailArgs, "Send one email over SMTP."),
    "noop": Task(noop, NoArgs, "Do nothing."),
}
