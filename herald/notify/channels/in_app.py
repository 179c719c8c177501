"""In-app channel: each user's inbox in Redis, and a pub/sub message per new item for live clients.

Keys of one user (the `{user}` hash tag keeps them in one cluster slot, as the Lua script needs):

- `inbox:{<user>}:ids`     sorted set of notification ids, scored by arrival order (newest = highest)
- `inbox:{<user>}:unread`  sorted set of the unread ids, same scores (so unread pages keep the order)
- `inbox:{<user>}:items`   hash: notification id -> item JSON (without `read`, which the unread set holds)
- `inbox:{<user>}:seq`     counter that gives the arrival order

New items are published as JSON on the channel `inbox:{<user>}:events` (`channel_name`).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from herald.exceptions import PermanentError, TransientError
from herald.infra import connections, keys
from herald.infra.patterns import ID_PATTERN
from herald.notify.channels.base import Message
from settings import Settings

_USER_ID = re.compile(ID_PATTERN)

# KEYS: ids, unread, items, seq. ARGV: id, stored JSON, inbox size, channel, published JSON.
# Returns 1 when stored (and published), 0 when the id was already there (a retried delivery).
_STORE = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return 0
end
local score = redis.call('INCR', KEYS[4])
redis.call('ZADD', KEYS[1], score, ARGV[1])
redis.call('ZADD', KEYS[2], score, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
local keep = tonumber(ARGV[3])
for _, old in ipairs(redis.call('ZRANGE', KEYS[1], 0, -keep - 1)) do
  redis.call('ZREM', KEYS[2], old)
  redis.call('HDEL', KEYS[3], old)
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -keep - 1)
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""


def valid_user_id(user_id: str) -> bool:
    return _USER_ID.fullmatch(user_id) is not None


def _prefix(user_id: str) -> str:
    if not valid_user_id(user_id):
        raise ValueError(f"invalid user id {user_id!r}")
    return keys.inbox(user_id)


def _keys(user_id: str) -> tuple[str, str, str, str]:
    """The ids, unread, items and seq keys of one user."""
    prefix = _prefix(user_id)
    return f"{prefix}:ids", f"{prefix}:unread", f"{prefix}:items", f"{prefix}:seq"


def channel_name(user_id: str) -> str:
    """The pub/sub channel that carries each new item of `user_id` as JSON."""
    return f"{_prefix(user_id)}:events"


def item_of(message: Message) -> dict[str, Any]:
    """The inbox item of a message, as listed and as published."""
    return {
        "id": message.notification_id,
        "delivery_id": message.delivery_id,
        "title": message.title,
        "body": message.body,
        "created_at": message.created_at,
        "read": False,
        "data": message.payload,
    }


def send(settings: Settings, message: Message) -> None:
    """Store the item in the user's inbox (once per notification id), trim it, publish the item."""
    if not valid_user_id(message.user_id):
        raise PermanentError(f"invalid user id {message.user_id!r}")
    item = item_of(message)
    stored = {name: value for name, value in item.items() if name != "read"}
    client = connections.redis_client(settings)
    size, channel = settings.inbox_size, channel_name(message.user_id)
    try:
        client.register_script(_STORE)(
            keys=list(_keys(message.user_id)),
            args=[message.notification_id, json.dumps(stored), size, channel, json.dumps(item)],
        )
    except RedisError as exc:
        raise TransientError(f"redis: {type(exc).__name__}: {exc}") from exc


def list_items(
    client: Redis, user_id: str, offset: int, limit: int, unread_only: bool = False
) -> tuple[int, list[dict[str, Any]]]:
    """One page of the inbox, newest first, and how many items the filter matches."""
    ids_key, unread_key, items_key, _ = _keys(user_id)
    with client.pipeline(transaction=True) as pipeline:
        listed = unread_key if unread_only else ids_key
        pipeline.zcard(listed)
        pipeline.zrevrange(listed, offset, offset + limit - 1)
        total, ids = pipeline.execute()
    if not ids:
        return total, []
    with client.pipeline(transaction=True) as pipeline:
        pipeline.hmget(items_key, ids)
        pipeline.zmscore(unread_key, ids)
        items, unread_scores = pipeline.execute()
    return total, [
        {**json.loads(raw), "read": score is None}
        for raw, score in zip(items, unread_scores, strict=True)
        if raw is not None  # trimmed between the two reads
    ]


def unread_count(client: Redis, user_id: str) -> int:
    return int(client.zcard(_keys(user_id)[1]))


def get_item(client: Redis, user_id: str, notification_id: str) -> dict[str, Any] | None:
    _, unread_key, items_key, _ = _keys(user_id)
    with client.pipeline(transaction=True) as pipeline:
        pipeline.hget(items_key, notification_id)
        pipeline.zscore(unread_key, notification_id)
        raw, score = pipeline.execute()
    return None if raw is None else {**json.loads(raw), "read": score is None}


def mark_read(client: Redis, user_id: str, notification_id: str) -> bool:
    """Mark one item read; False when the inbox has no such item."""
    _, unread_key, items_key, _ = _keys(user_id)
    with client.pipeline(transaction=True) as pipeline:
        pipeline.hexists(items_key, notification_id)
        pipeline.zrem(unread_key, notification_id)
        exists, _ = pipeline.execute()
    return bool(exists)


# KEYS: ids, unread, items, seq. ARGV: the ids to remove. Returns how many items were removed.
_PURGE = """
local removed = 0
for _, id in ipairs(ARGV) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  removed = removed + redis.call('HDEL', KEYS[3], id)
end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[4])
end
return removed
"""


def purge_older_than(connection: Redis, cutoff: datetime) -> tuple[int, int]:
    """Remove every inbox item created before `cutoff`: (items removed, inboxes touched).

    No TTL can do it: the items of an inbox are members of one sorted set and fields of one hash.
    An inbox left empty loses its arrival counter too, so no key of it stays behind.
    """
    removed = inboxes = 0
    for items_key in connection.scan_iter(match="inbox:{*}:items", count=500, _type="hash"):
        user_id = items_key.decode().removeprefix("inbox:{").removesuffix("}:items")
        if valid_user_id(user_id) and (count := _purge_inbox(connection, user_id, cutoff)):
            removed, inboxes = removed + count, inboxes + 1
    return removed, inboxes


def _purge_inbox(connection: Redis, user_id: str, cutoff: datetime) -> int:
    keys = _keys(user_id)
    old = [item_id for item_id, raw in connection.hgetall(keys[2]).items() if _created_before(raw, cutoff)]
    return int(connection.register_script(_PURGE)(keys=list(keys), args=old)) if old else 0


def _created_before(raw: bytes | str, cutoff: datetime) -> bool:
    """Whether a stored item was created before `cutoff`; an item without a readable time is kept."""
    try:
        created = datetime.fromisoformat(json.loads(raw)["created_at"])
    except (ValueError, KeyError, TypeError):
        return False
    return created.tzinfo is not None and created < cutoff
