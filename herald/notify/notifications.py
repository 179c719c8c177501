"""Notification and delivery records in Redis, shared by the API (create, view, cancel) and workers.

`notification:<id>` is a hash of the notification; `delivery:<id>` a hash per channel delivery, whose
id is also the id of the RQ job that makes it. Records expire `RECORD_TTL_SECONDS` after creation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from redis import Redis
from redis.client import Pipeline
from redis.typing import EncodableT

from herald.infra import keys
from herald.infra.statuses import DeliveryStatus
from herald.notify.channels.base import Message
from herald.schemas import DeliveryView, NotificationView

RECORD_TTL_SECONDS = 30 * 86_400


def new_id() -> str:
    return uuid4().hex


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def notification_key(notification_id: str) -> str:
    return keys.notification(notification_id)


def delivery_key(delivery_id: str) -> str:
    return keys.delivery(delivery_id)


def write(pipeline: Pipeline, notification: dict[str, Any], deliveries: list[dict[str, Any]]) -> None:
    """Add the records of a new notification and its deliveries to `pipeline` (a transaction)."""
    key = notification_key(notification["notification_id"])
    pipeline.hset(key, mapping=encode({**notification, "deliveries": [d["delivery_id"] for d in deliveries]}))
    pipeline.expire(key, RECORD_TTL_SECONDS)
    for delivery in deliveries:
        write_delivery(pipeline, delivery)


def write_delivery(pipeline: Pipeline, delivery: dict[str, Any]) -> None:
    pipeline.hset(delivery_key(delivery["delivery_id"]), mapping=encode(delivery))
    pipeline.expire(delivery_key(delivery["delivery_id"]), RECORD_TTL_SECONDS)


def new_delivery(
    message: Message,
    channel: str,
    max_attempts: int,
    status: str,
    expires_at: str | None,
    scheduled_for: str | None = None,
    skip_reason: str | None = None,
) -> dict[str, Any]:
    created = message.created_at
    return {
        "delivery_id": message.delivery_id,
        "notification_id": message.notification_id,
        "channel": channel,
        "status": status,
        "job_id": message.delivery_id,
        "attempts": 0,
        "max_attempts": max_attempts,
        "expires_at": expires_at,
        "scheduled_for": scheduled_for,
        "skip_reason": skip_reason,
        "created_at": created,
        "updated_at": created,
        "message": asdict(message),
    }


def load_delivery(connection: Redis, delivery_id: str) -> dict[str, Any] | None:
    return decode(connection.hgetall(delivery_key(delivery_id)))


READ_FOR_SEND_SCRIPT = """
local delivery = redis.call('HGETALL', KEYS[1])
if #delivery == 0 then return {delivery, false, {}} end
local preferences = false
for i = 1, #delivery, 2 do
  if delivery[i] == 'message' then
    local read, message = pcall(cjson.decode, delivery[i + 1])
    if read and type(message.user_id) == 'string' then
      preferences = redis.call('HGETALL', ARGV[1] .. message.user_id)
    end
  end
end
return {delivery, redis.call('GET', KEYS[2]), preferences}
"""
"""A delivery's hash (KEYS[1]), its job's sent marker (KEYS[2]) and the stored preferences of its
message's user (ARGV[1] + user id: a key named by the record, so not declared in KEYS; the service runs
no Redis Cluster); the preferences are nil where Lua's cjson could not read the message (left to Python)."""


@dataclass(frozen=True)
class ForSend:
    """What a worker reads of a delivery before it sends, in one round trip (`load_for_send`)."""

    delivery: dict[str, Any] | None
    """The record; None if it expired or was deleted."""
    sent: bool
    """An earlier run of its job sent it (`sent_once`)."""
    preferences: dict[str, Any] | None
    """The stored preferences of its user, decoded (`preferences.from_stored` makes them whole); None:
    not read (the script could not decode the message: the caller reads them itself)."""


def load_for_send(connection: Redis, delivery_id: str, sent_key: str) -> ForSend:
    raw, sent, stored = connection.register_script(READ_FOR_SEND_SCRIPT)(
        keys=[delivery_key(delivery_id), sent_key], args=[keys.preferences("")]
    )
    delivery = decode(dict(zip(raw[::2], raw[1::2], strict=True)))
    wanted = None if stored is None else decode(dict(zip(stored[::2], stored[1::2], strict=True))) or {}
    return ForSend(delivery, sent is not None, wanted)


def load_notification(connection: Redis, notification_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    notification = decode(connection.hgetall(notification_key(notification_id)))
    if notification is None:
        return None
    with connection.pipeline(transaction=False) as pipeline:
        for delivery_id in notification["deliveries"]:
            pipeline.hgetall(delivery_key(delivery_id))
        deliveries = [decode(raw) for raw in pipeline.execute()]
    return notification, [delivery for delivery in deliveries if delivery is not None]


UPDATE_EXISTING_SCRIPT = "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], unpack(ARGV)) end"
"""HSET the field-value pairs in ARGV if the hash KEYS[1] exists."""


def update(connection: Redis | Pipeline, delivery_id: str, **fields: Any) -> None:
    """Set fields of an existing delivery, never recreating one that expired (one atomic command; on a
    pipeline, sent with it)."""
    words = [word for pair in encode({**fields, "updated_at": now_iso()}).items() for word in pair]
    connection.eval(UPDATE_EXISTING_SCRIPT, 1, delivery_key(delivery_id), *words)


START_ATTEMPT_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], unpack(ARGV))
return attempts
"""
"""Count an attempt on the delivery KEYS[1] and HSET the field-value pairs in ARGV; the attempts now,
or 0 if the record is gone (it is not made again)."""


def start_attempt(connection: Redis, delivery: dict[str, Any]) -> int:
    """Mark the delivery `sending` and count the attempt (one atomic script); the attempt's number."""
    words = [
        word for pair in encode({"status": DeliveryStatus.SENDING, "updated_at": now_iso()}).items() for word in pair
    ]
    attempts = connection.register_script(START_ATTEMPT_SCRIPT)(
        keys=[delivery_key(delivery["delivery_id"])], args=words
    )
    return int(attempts) or int(delivery["attempts"]) + 1


def save_contact(connection: Redis, user_id: str, contact: dict[str, str | None]) -> None:
    """A user's stored email address and webhook URL, used when a request names none.

    The address is stored as `email` (its name before the API called it `to`), so contacts stored
    by earlier versions are read as they are.
    """
    connection.hset(keys.contact(user_id), mapping=encode(contact))


def load_contact(connection: Redis, user_id: str) -> dict[str, Any]:
    return decode(connection.hgetall(keys.contact(user_id))) or {}


def view(notification: dict[str, Any], deliveries: list[dict[str, Any]]) -> NotificationView:
    return NotificationView(
        **{field: notification.get(field) for field in NotificationView.model_fields if field != "deliveries"},
        deliveries=[delivery_view(delivery) for delivery in deliveries],
    )


def delivery_view(delivery: dict[str, Any]) -> DeliveryView:
    return DeliveryView(**{field: delivery.get(field) for field in DeliveryView.model_fields})


def encode(fields: dict[str, Any]) -> dict[EncodableT, EncodableT]:
    """Each field as JSON, so numbers, None and nested values come back as they went in."""
    return {name: json.dumps(value) for name, value in fields.items()}


def decode(raw: dict[Any, Any]) -> dict[str, Any] | None:
    """The fields of a hash read with a bytes-returning client; None for a missing record."""
    return {name.decode(): json.loads(value) for name, value in raw.items()} if raw else None
