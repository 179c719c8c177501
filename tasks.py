"""The job functions and the registry clients pick them from by name.

Each job function is an entry point (RQ imports it by its dotted path, in our workers and in a stock
`rq worker -c rqconfig`): it reads the settings once, with `get_settings()`, and passes them down.

Only functions in `TASKS` can be enqueued through the API; a name from a request is
looked up here and never handed to RQ, which would import any dotted path it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from redis import Redis
from rq import get_current_job
from rq.job import Job

from herald.exceptions import PermanentError, TemplateError
from herald.infra import connections, metrics
from herald.infra.statuses import DeliveryStatus
from herald.jobs import sent_once
from herald.notify import digests, notifications, preferences
from herald.notify.channels import CHANNELS, Message, email, in_app
from herald.schemas import AwaitArgs, EmailArgs, NoArgs, Preferences
from settings import Settings, get_settings

log = logging.getLogger("tasks")


def send_email(to: str, subject: str, body: str) -> dict[str, str]:
    """Send one email over SMTP and return its Message-ID; a re-run of a job that sent it sends nothing."""
    job = get_current_job()
    message_id = sent_once.sent_marker(job)
    if message_id is None:
        settings = get_settings()
        message = email.build_message(settings, to, subject, body, unique_id=job.id if job else None)
        email.send(settings, message)
        message_id = sent_once.mark_sent(settings, job, str(message["Message-ID"]))
    return {"to": to, "message_id": message_id}


def deliver_notification(delivery_id: str) -> dict[str, str]:
    """Make one channel delivery of a notification, keeping its record up to date.

    Not in `TASKS`: clients create deliveries through `POST /notifications` only. A transient
    error is re-raised for RQ to retry with backoff; a permanent one stops the retries.
    """
    job = get_current_job()
    assert job is not None, "runs as an RQ job"
    connection = job.connection
    read = notifications.load_for_send(connection, delivery_id, sent_once.sent_key(job))
    delivery = read.delivery
    if delivery is None:
        raise PermanentError(f"delivery {delivery_id} has no record (expired or deleted)")
    if delivery["status"] == DeliveryStatus.CANCELED:
        return _result(DeliveryStatus.CANCELED)
    if delivery["expires_at"] and datetime.fromisoformat(delivery["expires_at"]) <= datetime.now(UTC):
        notifications.update(connection, delivery_id, status=DeliveryStatus.EXPIRED)
        _report(connection, DeliveryStatus.EXPIRED, _log_fields(delivery, delivery["attempts"]))
        return _result(DeliveryStatus.EXPIRED)
    if reason := _skip_reason(delivery, _preferences(connection, delivery, read.preferences)):
        notifications.update(connection, delivery_id, status=DeliveryStatus.SKIPPED, skip_reason=reason)
        _report(connection, DeliveryStatus.SKIPPED, _log_fields(delivery, delivery["attempts"]))
        return _result(DeliveryStatus.SKIPPED)
    return _attempt(get_settings(), job, delivery, read.sent)


def deliver_digest(delivery_id: str) -> dict[str, str]:
    """At the end of a digest's window: close it and send its one message, made from the items still
    wanted (`digests.prepare`), as a delivery with the same retries as any other."""
    job = get_current_job()
    assert job is not None, "runs as an RQ job"
    delivery = notifications.load_delivery(job.connection, delivery_id)
    if delivery is None:
        raise PermanentError(f"digest delivery {delivery_id} has no record (expired or deleted)")
    if delivery["status"] == DeliveryStatus.CANCELED:
        return _result(DeliveryStatus.CANCELED)
    try:
        prepared = digests.prepare(job.connection, delivery)
    except TemplateError as exc:  # the digest template was broken after the service started
        error = PermanentError(f"digest not rendered: {exc}")
        _record_failure(job, delivery_id, error)
        _report(job.connection, DeliveryStatus.FAILED, _log_fields(delivery, delivery["attempts"]), error)
        raise error from exc
    if isinstance(prepared, str):
        return _settle_empty(job.connection, delivery, prepared)
    return _attempt(get_settings(), job, prepared, sent_once.sent_marker(job) is not None)


def _settle_empty(connection: Redis, delivery: dict[str, Any], status: str) -> dict[str, str]:
    """A digest with no item left to send: every one canceled, expired or opted out."""
    reason = preferences.OPTED_OUT if status == DeliveryStatus.SKIPPED else None
    notifications.update(connection, delivery["delivery_id"], status=status, skip_reason=reason)
    _report(connection, status, _log_fields(delivery, delivery["attempts"]))
    return _result(status)


def _attempt(settings: Settings, job: Job, delivery: dict[str, Any], sent_before: bool) -> dict[str, str]:
    """One attempt at a delivery, its outcome recorded; a failure re-raised for RQ to retry or fail.
    `sent_before`: an earlier run of this job sent it and its worker died before recording it
    (`sent_once`): nothing is sent again."""
    connection, delivery_id = job.connection, delivery["delivery_id"]
    fields = _log_fields(delivery, notifications.start_attempt(connection, delivery))
    try:
        if not sent_before:
            CHANNELS[delivery["channel"]](settings, Message(**delivery["message"]))
    except Exception as exc:
        retrying = _record_failure(job, delivery_id, exc)
        _report(connection, DeliveryStatus.RETRYING if retrying else DeliveryStatus.FAILED, fields, exc)
        raise
    with connection.pipeline(transaction=False) as pipeline:  # one round trip for what follows a send
        if not sent_before:
            sent_once.mark_sent(settings, job, DeliveryStatus.DELIVERED, pipeline)
        delivered_at = notifications.now_iso()
        notifications.update(pipeline, delivery_id, status=DeliveryStatus.DELIVERED, delivered_at=delivered_at)
        pipeline.execute()
    _report(connection, DeliveryStatus.DELIVERED, fields)
    return _result(DeliveryStatus.DELIVERED)


def _result(status: str) -> dict[str, str]:
    """A delivery job's return value: its status as a plain string (RQ pickles it into the job's result)."""
    return {"status": str(status)}


def _skip_reason(delivery: dict[str, Any], wanted: Preferences) -> str | None:
    """The user's preferences, read again at send time: an opt-out made after the notification was
    accepted (while it waited for its time, or between retries) is obeyed."""
    message = delivery["message"]
    topic, required = message.get("topic", "general"), message.get("required", False)
    return preferences.skip_reason(wanted, topic, delivery["channel"], required)


def _preferences(connection: Redis, delivery: dict[str, Any], stored: dict[str, Any] | None) -> Preferences:
    """The preferences read with the delivery; read here when its script could not (`load_for_send`)."""
    if stored is None:
        return preferences.load(connection, delivery["message"]["user_id"])
    return preferences.from_stored(stored)


def _log_fields(delivery: dict[str, Any], attempt: int) -> dict[str, Any]:
    return {
        "delivery_id": delivery["delivery_id"],
        "channel": delivery["channel"],
        "attempt": attempt,
        "correlation_id": delivery["message"].get("correlation_id") or None,
    }


def _report(connection: Redis, outcome: str, fields: dict[str, Any], exc: Exception | None = None) -> None:
    """One log line and the metrics of a delivery attempt's outcome: delivered, retrying, failed or expired."""
    if outcome == DeliveryStatus.RETRYING:
        metrics.delivery_retrying(connection, fields["channel"])
    else:
        exhausted = outcome == DeliveryStatus.FAILED and not isinstance(exc, PermanentError)
        metrics.delivery_settled(connection, fields["channel"], outcome, exhausted)
    levels: dict[str, int] = {DeliveryStatus.RETRYING: logging.WARNING, DeliveryStatus.FAILED: logging.ERROR}
    level = levels.get(outcome, logging.INFO)
    error = {"error": f"{type(exc).__name__}: {exc}"} if exc else {}
    log.log(level, "notification delivery %s", outcome, extra={**fields, "outcome": outcome, **error})


def _record_failure(job: Job, delivery_id: str, exc: Exception) -> bool:
    """Keep the error on the delivery record; True when RQ will retry."""
    permanent = isinstance(exc, PermanentError)
    retrying = not permanent and bool(job.retries_left)
    next_retry = datetime.now(UTC) + timedelta(seconds=job.get_retry_interval()) if retrying else None
    notifications.update(
        job.connection,
        delivery_id,
        status=DeliveryStatus.RETRYING if retrying else DeliveryStatus.FAILED,
        last_error=f"{type(exc).__name__}: {exc}",
        error_category="permanent" if permanent else "transient",
        next_retry_at=next_retry.isoformat() if next_retry else None,
    )
    return retrying


def purge_expired() -> dict[str, int]:
    """Daily housekeeping (`cron.py`): remove what is past its retention and no Redis TTL removes.

    That is the in-app inbox items older than `INBOX_RETENTION_DAYS`. Notification and delivery
    records need nothing here: they expire by their own TTL (`notifications.RECORD_TTL_SECONDS`).
    """
    job, settings = get_current_job(), get_settings()
    connection = job.connection if job else connections.redis_client(settings)
    cutoff = datetime.now(UTC) - timedelta(days=settings.inbox_retention_days)
    items, inboxes = in_app.purge_older_than(connection, cutoff)
    log.info("purged expired inbox items", extra={"items": items, "inboxes": inboxes})
    return {"inbox_items": items, "inboxes": inboxes}


def noop() -> None:
    """Do nothing: a cheap job for health checks and benchmarks."""


def await_completion(description: str) -> None:
    """Never run by a worker: such a job waits (RQ status deferred) until `states.complete_job` (`herald.jobs`)
    finishes it."""
    raise PermanentError("await_completion jobs are finished by complete_task, not run by a worker")


@dataclass(frozen=True)
class Task:
    func: Callable[..., Any]
    args: type[BaseModel]
    description: str
    waits: bool = False
    """True: the job is parked until a person or outside system completes it (`herald.jobs.states.complete_job`)."""


TASKS: dict[str, Task] = {
    "send_email": Task(send_email, EmailArgs, "Send one email over SMTP."),
    "noop": Task(noop, NoArgs, "Do nothing."),
    "purge_expired": Task(purge_expired, NoArgs, "Remove inbox items past INBOX_RETENTION_DAYS (runs daily)."),
    "await_completion": Task(await_completion, AwaitArgs, "Wait until completed with a result.", waits=True),
}
