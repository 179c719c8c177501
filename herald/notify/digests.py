"""Digests: a user's notifications of one channel and digest key, gathered over a window into one delivery.

The first notification for a user, channel and `digest_key` opens a digest; those that follow while it
is open join it; at the window's end its delivery job (`tasks.deliver_digest`) closes it and sends one
message made from every item with the `digest` template.

Keys (hash values JSON, as in `notifications`):

- `digest:open:<user>:<channel>:<digest key>`  the id of the open digest; it expires when the window ends
- `digest:<id>`        hash: user_id, channel, digest_key, status (`open`, `closed`), opened_at,
                       window_ends_at, closed_at, sent_notification_ids
- `digest:<id>:items`  list of the items (JSON), in arrival order
- `delivery:<id>`      the digest's delivery record; its id is also the digest's and its job's

Several API processes may add to one digest at once. Adding is an optimistic transaction: WATCH the
pointer and the digest, read them, then MULTI/EXEC the item (a join) or the new digest, its delivery and
its job (an open). A join changes neither watched key, so joins never make each other retry; an open or a
close does, and the retry then joins the new digest or opens one. Closing is one script that marks the
digest closed and reads its items: an item either joined before that read, or finds the digest closed
and opens the next one. None is lost, and one window is open per key at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError

from herald.exceptions import PartTooLargeError, ServiceError
from herald.infra import keys, metrics
from herald.infra.statuses import DeliveryStatus
from herald.notify import notifications, preferences, rendering
from herald.notify.channels.base import Message
from herald.schemas import DigestView, Preferences

TEMPLATE = "digest"
ITEM_FIELDS = ("notification_id", "title", "body", "created_at")
"""What templates see of each item (`items`), beside `count`, `more` and `digest_key`."""
ITEM_BODY_CHARS = 1_000
"""A digest shows each item's body up to this many characters (the item's own record keeps it whole)."""
MAX_TRIES = 100
"""Transactions that may abort (each because a digest of the notification opened or closed) before giving up."""

_CLOSE = """
-- KEYS: digest, items, pointer. ARGV: digest id, closed_at (JSON). Returns the items.
if redis.call('GET', KEYS[3]) == ARGV[1] then
  redis.call('DEL', KEYS[3])
end
if redis.call('HGET', KEYS[1], 'status') == '"open"' then
  redis.call('HSET', KEYS[1], 'status', '"closed"', 'closed_at', ARGV[2])
end
return redis.call('LRANGE', KEYS[2], 0, -1)
"""

Schedule = Callable[[Pipeline, dict[str, Any], datetime], None]
"""Add the job of a new digest's delivery record, due at the datetime, to the transaction (the caller
knows the jobs layer; this module does not, for `tasks` imports it)."""
WriteRecords = Callable[[Pipeline], None]


class DigestBusyError(ServiceError):
    """The digest changed under every try (503): the client may send the notification again."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": "1"}


def pointer_key(user_id: str, channel: str, digest_key: str) -> str:
    return keys.digest_pointer(user_id, channel, digest_key)


def record_key(digest_id: str) -> str:
    return keys.digest(digest_id)


def items_key(digest_id: str) -> str:
    return keys.digest_items(digest_id)


# Adding a notification (API)


def add(
    connection: Redis,
    deliveries: list[dict[str, Any]],
    digest_key: str,
    due: datetime,
    schedule: Schedule,
    write_records: WriteRecords,
) -> None:
    """Let each delivery not skipped join its channel's open digest, or open one due at `due`, and
    write the notification's records (`write_records`, after the deliveries are marked `digested`),
    all in one transaction."""
    joining = [delivery for delivery in deliveries if delivery["status"] != DeliveryStatus.SKIPPED]
    with connection.pipeline() as pipeline:
        for _ in range(MAX_TRIES):
            try:
                _add_once(pipeline, joining, digest_key, due, schedule, write_records)
                return
            except WatchError:
                continue  # a digest opened or closed meanwhile: look again
    raise DigestBusyError(f"digest {digest_key!r} kept changing; send the notification again")


def _add_once(
    pipeline: Pipeline,
    joining: list[dict[str, Any]],
    digest_key: str,
    due: datetime,
    schedule: Schedule,
    write_records: WriteRecords,
) -> None:
    found = {delivery["channel"]: _open_digest(pipeline, delivery, digest_key) for delivery in joining}
    pipeline.multi()
    for delivery in joining:
        digest = found[delivery["channel"]] or _open(pipeline, delivery, digest_key, due, schedule)
        _join(pipeline, digest, delivery)
    write_records(pipeline)
    pipeline.execute()


def _open_digest(pipeline: Pipeline, delivery: dict[str, Any], digest_key: str) -> tuple[str, str] | None:
    """(id, window end) of the channel's open digest, or None; the pointer and the digest stay watched,
    so that a close or an open before EXEC aborts the transaction."""
    pointer = pointer_key(delivery["message"]["user_id"], delivery["channel"], digest_key)
    pipeline.watch(pointer)
    raw_id: bytes | None = pipeline.get(pointer)  # type: ignore[assignment]
    if raw_id is None:
        return None
    digest_id = raw_id.decode()
    pipeline.watch(record_key(digest_id))
    status, ends = pipeline.hmget(record_key(digest_id), "status", "window_ends_at")
    if status is None or ends is None or json.loads(status) != "open":
        return None
    return digest_id, str(json.loads(ends))


def _open(
    pipeline: Pipeline, delivery: dict[str, Any], digest_key: str, due: datetime, schedule: Schedule
) -> tuple[str, str]:
    """Queue the commands of a new digest: its record, pointer, delivery record and job."""
    digest_id, user_id, channel = notifications.new_id(), delivery["message"]["user_id"], delivery["channel"]
    fields = {"delivery_id": digest_id, "user_id": user_id, "channel": channel, "digest_key": digest_key}
    fields |= {"status": "open", "opened_at": notifications.now_iso(), "window_ends_at": due.isoformat()}
    pipeline.hset(record_key(digest_id), mapping=notifications.encode(fields))
    pipeline.expire(record_key(digest_id), notifications.RECORD_TTL_SECONDS)
    pipeline.set(pointer_key(user_id, channel, digest_key), digest_id, pxat=int(due.timestamp() * 1000))
    record = _delivery_record(digest_id, delivery, due)
    notifications.write_delivery(pipeline, record)
    metrics.NOTIFICATIONS_CREATED.inc(pipeline, channel)
    schedule(pipeline, record, due)
    return digest_id, due.isoformat()


def _delivery_record(digest_id: str, opening: dict[str, Any], due: datetime) -> dict[str, Any]:
    """The digest's delivery: the opening delivery's target, attempts and correlation id; its content
    is made when it closes."""
    message = {**opening["message"], "delivery_id": digest_id, "notification_id": digest_id, "title": "", "body": ""}
    message |= {"html": None, "payload": {}}
    now = notifications.now_iso()
    return {
        **{field: opening[field] for field in ("channel", "max_attempts")},
        **{"delivery_id": digest_id, "notification_id": None, "job_id": digest_id, "status": DeliveryStatus.SCHEDULED},
        **{"attempts": 0, "expires_at": None, "skip_reason": None, "scheduled_for": due.isoformat()},
        **{"created_at": now, "updated_at": now, "message": message},
    }


def _join(pipeline: Pipeline, digest: tuple[str, str], delivery: dict[str, Any]) -> None:
    digest_id, ends = digest
    pipeline.rpush(items_key(digest_id), json.dumps(_item(delivery)))
    pipeline.expire(items_key(digest_id), notifications.RECORD_TTL_SECONDS)
    delivery.update(status=DeliveryStatus.DIGESTED, digest_delivery_id=digest_id, job_id=digest_id, scheduled_for=ends)


def _item(delivery: dict[str, Any]) -> dict[str, Any]:
    message = delivery["message"]
    item = {field: message[field] for field in ("notification_id", "title", "body", "created_at", "topic", "required")}
    return {**item, "delivery_id": delivery["delivery_id"], "expires_at": delivery["expires_at"]}


def cancel_item(connection: Redis, delivery: dict[str, Any]) -> bool:
    """Cancel a `digested` delivery while its digest is open; False once it closed (it is being sent)."""
    key = record_key(delivery["digest_delivery_id"])
    with connection.pipeline() as pipeline:
        try:
            pipeline.watch(key)
            if json.loads(pipeline.hget(key, "status") or "null") != "open":
                return False
            pipeline.multi()
            changes = {"status": DeliveryStatus.CANCELED, "updated_at": notifications.now_iso()}
            pipeline.hset(notifications.delivery_key(delivery["delivery_id"]), mapping=notifications.encode(changes))
            pipeline.execute()
        except WatchError:  # only a close changes the digest's record
            return False
    return True


# Sending a digest (worker)


def prepare(connection: Redis, delivery: dict[str, Any]) -> dict[str, Any] | str:
    """The digest's delivery with its message, made from the items still wanted (the first run closes the
    digest and keeps the message for retries); or the status to settle with when no item is left."""
    digest = _load(connection, delivery["delivery_id"])
    if digest is None:
        return DeliveryStatus.EXPIRED  # its records outlived their TTL
    if digest.get("sent_notification_ids") is None:
        return _close_and_make(connection, delivery, digest)
    return delivery if digest["sent_notification_ids"] else _settled_as(delivery)


SETTLED_EMPTY = frozenset({DeliveryStatus.SKIPPED, DeliveryStatus.EXPIRED, DeliveryStatus.CANCELED})
"""What an empty digest can have settled as."""


def _settled_as(delivery: dict[str, Any]) -> str:
    """The status of an empty digest run again (its worker died after closing it)."""
    return delivery["status"] if delivery["status"] in SETTLED_EMPTY else DeliveryStatus.CANCELED


def _close_and_make(connection: Redis, delivery: dict[str, Any], digest: dict[str, Any]) -> dict[str, Any] | str:
    items = close(connection, digest)
    sent, left_out = select(connection, digest, items, datetime.now(UTC))
    made = {**delivery, "message": asdict(make_message(delivery, digest, sent))} if sent else None
    with connection.pipeline() as pipeline:
        for item, status in left_out:
            reason = preferences.OPTED_OUT if status == DeliveryStatus.SKIPPED else None
            changes = {"status": status, "skip_reason": reason, "updated_at": notifications.now_iso()}
            pipeline.hset(notifications.delivery_key(item["delivery_id"]), mapping=notifications.encode(changes))
        sent_ids = [item["notification_id"] for item in sent]
        pipeline.hset(record_key(digest["delivery_id"]), "sent_notification_ids", json.dumps(sent_ids))
        if made:
            pipeline.hset(notifications.delivery_key(delivery["delivery_id"]), "message", json.dumps(made["message"]))
        pipeline.execute()
    _count(connection, digest["channel"], sent, left_out)
    return made or _empty_outcome([status for _, status in left_out])


def close(connection: Redis, digest: dict[str, Any]) -> list[dict[str, Any]]:
    """Mark the digest closed (no item joins it any more) and return its items, in one script; again
    and again the same items."""
    digest_id = digest["delivery_id"]
    keys = [
        record_key(digest_id),
        items_key(digest_id),
        pointer_key(digest["user_id"], digest["channel"], digest["digest_key"]),
    ]
    raw = connection.register_script(_CLOSE)(keys=keys, args=[digest_id, json.dumps(notifications.now_iso())])
    return [json.loads(item) for item in raw]


def select(
    connection: Redis, digest: dict[str, Any], items: list[dict[str, Any]], now: datetime
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """The items to send, and those left out with the status their delivery settles with: `expired`
    past their `expires_at`, `skipped` when the user opted out meanwhile. Canceled ones are neither."""
    wishes = preferences.load(connection, digest["user_id"])
    with connection.pipeline(transaction=False) as pipeline:
        for item in items:
            pipeline.hget(notifications.delivery_key(item["delivery_id"]), "status")
        statuses = [json.loads(raw or "null") for raw in pipeline.execute()]
    waiting = [item for item, status in zip(items, statuses, strict=True) if status == DeliveryStatus.DIGESTED]
    outcomes = [(item, _left_out_as(item, wishes, digest["channel"], now)) for item in waiting]
    return [item for item, outcome in outcomes if outcome is None], [(i, o) for i, o in outcomes if o is not None]


def _left_out_as(item: dict[str, Any], wishes: Preferences, channel: Any, now: datetime) -> str | None:
    if item["expires_at"] and datetime.fromisoformat(item["expires_at"]) <= now:
        return DeliveryStatus.EXPIRED
    return DeliveryStatus.SKIPPED if preferences.skip_reason(wishes, item["topic"], channel, item["required"]) else None


def _empty_outcome(left_out: list[str]) -> str:
    """A digest with nothing left to send: skipped if any item was opted out, else expired or canceled."""
    return next(
        (status for status in (DeliveryStatus.SKIPPED, DeliveryStatus.EXPIRED) if status in left_out),
        DeliveryStatus.CANCELED,
    )


def _count(
    connection: Redis, channel: str, sent: list[dict[str, Any]], left_out: list[tuple[dict[str, Any], str]]
) -> None:
    """Each item settles once, when its digest closes: `digested`, or as it was left out."""
    for _ in sent:
        metrics.delivery_settled(connection, channel, DeliveryStatus.DIGESTED)
    for _, status in left_out:
        metrics.delivery_settled(connection, channel, status)


def make_message(delivery: dict[str, Any], digest: dict[str, Any], items: list[dict[str, Any]]) -> Message:
    """The one message of a digest: the `digest` template, rendered with its items, for its channel."""
    parts = _render_fitting([_shown(item) for item in items], digest["digest_key"])
    title, body, html, payload = _channel_parts(parts, delivery["channel"])
    base = delivery["message"]
    return Message(**{**base, "title": title, "body": body, "html": html, "payload": payload, **_about(items, base)})


def _shown(item: dict[str, Any]) -> dict[str, Any]:
    shown = {field: item[field] for field in ITEM_FIELDS}
    body = shown["body"]
    if isinstance(body, str) and len(body) > ITEM_BODY_CHARS:
        shown["body"] = body[:ITEM_BODY_CHARS] + "…"
    return shown


def _render_fitting(items: list[dict[str, Any]], digest_key: str) -> rendering.Rendered:
    """The template with as many items, from the first, as each part holds (`rendering.MAX_PART_BYTES`): a
    long digest still goes out, with its first items and the count of the others (`more`)."""
    shown = len(items)
    while True:
        context = {"items": items[:shown], "count": len(items), "more": len(items) - shown, "digest_key": digest_key}
        try:
            return rendering.render(TEMPLATE, context)
        except PartTooLargeError:
            if shown <= 1:
                raise
            shown //= 2


def _about(items: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    """Topic and `required` of the digest, for its unsubscribe link: its items' one topic (else the opening
    notification's); required, with no link, only when every item is."""
    topics = {item["topic"] for item in items}
    topic = topics.pop() if len(topics) == 1 else base["topic"]
    return {"topic": topic, "required": all(item["required"] for item in items)}


def _channel_parts(parts: rendering.Rendered, channel: str) -> tuple[str, str, str | None, dict[str, Any]]:
    if channel == "email":
        return parts.email_subject, parts.email_body, parts.email_html, {}
    if channel == "in_app":
        return parts.in_app_title, parts.in_app_body, None, {}
    return parts.title, parts.body, None, parts.webhook_payload


# Reading (API)


def _load(connection: Redis, digest_id: str) -> dict[str, Any] | None:
    return notifications.decode(connection.hgetall(record_key(digest_id)))


def view(connection: Redis, digest_id: str) -> DigestView | None:
    digest = _load(connection, digest_id)
    delivery = notifications.load_delivery(connection, digest_id)
    if digest is None or delivery is None:
        return None
    items = [json.loads(raw) for raw in connection.lrange(items_key(digest_id), 0, -1)]
    fields = ("delivery_id", "user_id", "channel", "digest_key", "status", "opened_at", "window_ends_at")
    return DigestView(
        **{field: digest[field] for field in fields},
        notification_ids=[item["notification_id"] for item in items],
        sent_notification_ids=digest.get("sent_notification_ids"),
        delivery=notifications.delivery_view(delivery),
    )
