"""Turn a notification request into its records and one delivery job per channel.

Everything a request can get wrong (template, variables, missing or refused targets) is found here,
before anything is written, so it is a 422 at request time and never a failed job later.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import tasks
from herald.exceptions import JobNotFoundError, JobStateError, TargetError
from herald.infra import metrics
from herald.infra.statuses import OPEN_DELIVERY_STATUSES, DeliveryStatus
from herald.jobs import backpressure, enqueue, queues, retries, states, store
from herald.notify import digests, notifications, preferences, rendering
from herald.notify import unsubscribe as unsubscribe_links
from herald.notify.channels.base import Message
from herald.notify.channels.webhook import check_url
from herald.rq_seam import limits
from herald.schemas import (
    QUEUE_OF_PRIORITY,
    DigestView,
    NotificationAccepted,
    NotificationRequest,
    NotificationView,
    Preferences,
)
from settings import Settings


@dataclass(frozen=True)
class Content:
    title: str
    body: str
    payload: dict[str, Any]
    html: str | None = None


@store.accepting
def create_notification(settings: Settings, request: NotificationRequest, correlation_id: str) -> NotificationAccepted:
    """Records and jobs of a new notification: a delivery the user opted out of is recorded as
    `skipped` and gets no job; a non-urgent one due in the user's quiet hours waits until they end."""
    connection = store.get_redis(settings)
    contents = _contents(request)
    targets = _targets(settings, request, notifications.load_contact(connection, request.user_id))
    wishes = preferences.load(connection, request.user_id)
    notification_id, created = notifications.new_id(), notifications.now_iso()
    due = None if request.digest_key else _due(request, wishes)
    queue = store.get_queue(QUEUE_OF_PRIORITY[request.priority], connection)
    backpressure.ensure_capacity(settings, queue)
    record = {
        **request.model_dump(mode="json", include=RECORDED_FIELDS),
        "notification_id": notification_id,
        "title": contents[request.channels[0]].title,
        "correlation_id": correlation_id,
        "created_at": created,
        "scheduled_for": due.isoformat() if due else None,
        "expires_at": request.expires_at.isoformat() if request.expires_at else None,
    }
    deliveries, jobs = [], []
    for channel in request.channels:
        content = contents[channel]
        message = Message(
            notifications.new_id(), notification_id, request.user_id, content.title, content.body,
            targets.get(channel), content.payload, created, correlation_id, content.html,
            request.topic, request.required,
        )  # fmt: skip
        attempts = _max_attempts(settings, channel)
        skipped = preferences.skip_reason(wishes, request.topic, channel, request.required)
        deliveries.append(_delivery_record(message, channel, attempts, record, skipped))
        if not skipped and not request.digest_key:
            jobs.append(
                _delivery_job(
                    settings,
                    queue,
                    tasks.deliver_notification,
                    message.delivery_id,
                    channel,
                    attempts,
                    correlation_id,
                    targets.get(channel),
                )
            )
    if request.digest_key:
        _add_to_digests(settings, request, wishes, queue, record, deliveries)
        return _accepted(record, deliveries)
    with store.transaction(settings) as pipeline:
        notifications.write(pipeline, record, deliveries)
        for job in jobs:
            enqueue.submit(queue, job, due, pipeline)
        _count(pipeline, deliveries)
    return _accepted(record, deliveries)


RECORDED_FIELDS = {
    *("user_id", "priority", "source_entity_type", "source_entity_id", "topic", "required"),
    *("digest_key", "digest_window_seconds"),
}


def _add_to_digests(
    settings: Settings,
    request: NotificationRequest,
    wishes: Preferences,
    queue: Any,
    record: dict[str, Any],
    deliveries: list[dict[str, Any]],
) -> None:
    """Each delivery not skipped joins its channel's open digest, or opens one whose window ends
    `digest_window_seconds` from now (or, if that falls in the user's quiet hours, when they end)."""
    assert request.digest_key is not None and request.digest_window_seconds is not None  # the schema's rule
    window_end = datetime.now(UTC) + timedelta(seconds=request.digest_window_seconds)
    due = preferences.quiet_until(wishes, window_end) or window_end

    def schedule(pipeline: Any, digest: dict[str, Any], due: datetime) -> None:
        correlation_id = digest["message"]["correlation_id"]
        target = digest["message"].get("target")
        args = (tasks.deliver_digest, digest["delivery_id"], digest["channel"], digest["max_attempts"], correlation_id)
        enqueue.submit(queue, _delivery_job(settings, queue, *args, target), due, pipeline)

    def write_records(pipeline: Any) -> None:
        notifications.write(pipeline, record, deliveries)
        _count(pipeline, deliveries)

    digests.add(store.get_redis(settings), deliveries, request.digest_key, due, schedule, write_records)


def _due(request: NotificationRequest, wishes: Preferences) -> datetime | None:
    """When the deliveries are due: as asked, or at the end of the user's quiet hours if that time falls
    inside them (urgent notifications excepted); None for now."""
    due = request.due_at()
    if request.priority == "urgent":
        return due
    return preferences.quiet_until(wishes, due or datetime.now(UTC)) or due


def _delivery_record(
    message: Message, channel: str, attempts: int, record: dict[str, Any], skipped: str | None
) -> dict[str, Any]:
    due = record["scheduled_for"]
    status = DeliveryStatus.SKIPPED if skipped else DeliveryStatus.SCHEDULED if due else DeliveryStatus.PENDING
    scheduled_for = due if status == DeliveryStatus.SCHEDULED else None
    return notifications.new_delivery(message, channel, attempts, status, record["expires_at"], scheduled_for, skipped)


def _count(pipeline: Any, deliveries: list[dict[str, Any]]) -> None:
    """Every delivery is created; a skipped one is settled at once."""
    for delivery in deliveries:
        metrics.NOTIFICATIONS_CREATED.inc(pipeline, delivery["channel"])
        if delivery["status"] == DeliveryStatus.SKIPPED:
            metrics.NOTIFICATIONS_DELIVERED.inc(pipeline, delivery["channel"], DeliveryStatus.SKIPPED)


def _delivery_job(
    settings: Settings,
    queue: Any,
    function: Callable[..., Any],
    delivery_id: str,
    channel: str,
    attempts: int,
    correlation_id: str,
    target: str | None,
) -> Any:
    """The job of one delivery (`tasks.deliver_notification`) or digest (`tasks.deliver_digest`), with the
    concurrency limit of its destination (`limits`)."""
    kind = "digest" if function is tasks.deliver_digest else "deliver"
    meta = {"task": f"{kind}_{channel}", "correlation_id": correlation_id}
    retry = retries.retry_policy(settings, retries=attempts - 1)
    return queue.create_job(
        function,
        kwargs={"delivery_id": delivery_id},
        job_id=delivery_id,
        meta=meta,
        rate_limit=limits.for_channel(channel, target, settings),
        **queues.job_options(settings, retry),
    )


def _max_attempts(settings: Settings, channel: str) -> int:
    return {"email": settings.email_max_attempts, "webhook": settings.webhook_max_attempts}.get(
        channel, settings.in_app_max_attempts
    )


def _contents(request: NotificationRequest) -> dict[str, Content]:
    """Per channel title, body and payload: the request's own, or its template rendered now."""
    source = {"type": request.source_entity_type, "id": request.source_entity_id} if request.source_entity_id else {}
    extra = {"source_entity": source} if source else {}
    if request.template is None:
        plain = Content(request.title or "", request.body or "", extra)
        return dict.fromkeys(request.channels, plain)
    parts = rendering.render(request.template, request.context)
    return {
        "email": Content(parts.email_subject, parts.email_body, extra, parts.email_html),
        "in_app": Content(parts.in_app_title, parts.in_app_body, extra),
        "webhook": Content(parts.title, parts.body, {**parts.webhook_payload, **extra}),
    }


def _targets(settings: Settings, request: NotificationRequest, contact: dict[str, Any]) -> dict[str, str]:
    targets: dict[str, str] = {}
    if "email" in request.channels:
        targets["email"] = _required(request.to or contact.get("email"), "email address (`to`)", request.user_id)
    if "webhook" in request.channels:
        url = _required(request.webhook_url or contact.get("webhook_url"), "webhook_url", request.user_id)
        check_webhook_url(settings, url)
        targets["webhook"] = url
    return targets


def check_webhook_url(settings: Settings, url: str) -> None:
    try:
        check_url(url, settings.webhook_allow_private)
    except ValueError as exc:  # refused, or a host that does not resolve
        raise TargetError(f"webhook_url refused: {exc}") from None


def _required(value: str | None, field: str, user_id: str) -> str:
    if not value:
        raise TargetError(f"no {field} in the request and none stored for user {user_id!r}")
    return value


def _accepted(record: dict[str, Any], deliveries: list[dict[str, Any]]) -> NotificationAccepted:
    return NotificationAccepted.model_validate(
        {
            "notification_id": record["notification_id"],
            "correlation_id": record["correlation_id"],
            "status_url": f"/notifications/{record['notification_id']}",
            "deliveries": deliveries,
        }
    )


def get_notification(settings: Settings, notification_id: str) -> NotificationView | None:
    found = notifications.load_notification(store.get_redis(settings), notification_id)
    return notifications.view(*found) if found else None


@store.accepting
def cancel_notification(settings: Settings, notification_id: str) -> NotificationView | None:
    """Cancel every delivery not yet sent; one being sent right now finishes."""
    connection = store.get_redis(settings)
    found = notifications.load_notification(connection, notification_id)
    if found is None:
        return None
    for delivery in found[1]:
        if _cancel_delivery(settings, connection, delivery):
            metrics.delivery_settled(connection, delivery["channel"], DeliveryStatus.CANCELED)
    return get_notification(settings, notification_id)


def _cancel_delivery(settings: Settings, connection: Any, delivery: dict[str, Any]) -> bool:
    """Cancel one delivery if it is still open; a digested one leaves its digest, until that closes."""
    if delivery["status"] == DeliveryStatus.DIGESTED:
        return digests.cancel_item(connection, delivery)
    if delivery["status"] not in OPEN_DELIVERY_STATUSES:
        return False
    notifications.update(connection, delivery["delivery_id"], status=DeliveryStatus.CANCELED)
    # A job that started meanwhile sees `canceled` if it runs again; one that expired is gone.
    with suppress(JobStateError, JobNotFoundError):
        states.cancel_job(settings, delivery["job_id"])
    return True


def get_digest(settings: Settings, delivery_id: str) -> DigestView | None:
    return digests.view(store.get_redis(settings), delivery_id)


@store.accepting
def retry_delivery(settings: Settings, notification_id: str, channel: str) -> NotificationView | None:
    """Manual retry of a failed delivery, with a fresh attempt budget."""
    connection = store.get_redis(settings)
    found = notifications.load_notification(connection, notification_id)
    if found is None:
        return None
    delivery = next((d for d in found[1] if d["channel"] == channel), None)
    if delivery is None or delivery["status"] != DeliveryStatus.FAILED:
        state = delivery["status"] if delivery else "not part of this notification"
        raise JobStateError(f"the {channel} delivery is {state}; only a failed delivery can be retried")
    states.requeue_job(settings, delivery["job_id"])
    notifications.update(
        connection, delivery["delivery_id"], status=DeliveryStatus.PENDING, attempts=0, next_retry_at=None
    )
    return get_notification(settings, notification_id)


def get_preferences(settings: Settings, user_id: str) -> Preferences:
    return preferences.load(store.get_redis(settings), user_id)


def save_preferences(settings: Settings, user_id: str, wishes: Preferences) -> Preferences:
    return preferences.save(store.get_redis(settings), user_id, wishes)


def unsubscribe(settings: Settings, token: str) -> unsubscribe_links.Subscription | None:
    """Turn off what a genuine unsubscribe token names (one topic, one channel); None, changing
    nothing, for any other token."""
    subscription = read_unsubscribe_token(settings, token)
    if subscription is not None:
        preferences.set_topic_channel(store.get_redis(settings), *subscription, wanted=False)
    return subscription


def read_unsubscribe_token(settings: Settings, token: str) -> unsubscribe_links.Subscription | None:
    return unsubscribe_links.read_token(settings.unsubscribe_secret.get_secret_value(), token)
