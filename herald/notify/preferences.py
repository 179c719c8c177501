"""Each user's notification preferences: channels on or off, per topic exceptions, quiet hours.

Stored as the hash `preferences:<user id>`, one field per setting, so that one change (an unsubscribe
link setting a topic's email off) is one HSET, never a read-modify-write racing another change:

- `channel:<channel>`          `true` / `false`
- `topic:<topic>:<channel>`    `true` / `false`
- `quiet_hours`                `{"start": "22:00", "end": "07:00", "timezone": "Europe/Berlin"}`

`skip_reason` is what senders call: the API when a notification comes in, the worker again just
before it sends (with the preferences it read with the delivery, `notifications.load_for_send`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, cast, get_args
from zoneinfo import ZoneInfo

from redis import Redis
from redis.typing import EncodableT

from herald.infra import keys
from herald.notify import quiet_hours
from herald.schemas import ChannelName, Preferences, QuietHours

OPTED_OUT = "opted_out"
CHANNELS: tuple[ChannelName, ...] = get_args(ChannelName)


def key(user_id: str) -> str:
    return keys.preferences(user_id)


def skip_reason(preferences: Preferences, topic: str, channel: ChannelName, required: bool = False) -> str | None:
    """Why a delivery of `topic` over `channel` must not be sent, or None to send it.

    A channel turned off, for every topic or for this one, is an opt-out; a `required` notification
    (a security alert, say) is sent all the same.
    """
    if required:
        return None
    wanted = preferences.channels.get(channel, True) and preferences.topics.get(topic, {}).get(channel, True)
    return None if wanted else OPTED_OUT


def quiet_until(preferences: Preferences, moment: datetime) -> datetime | None:
    """The end of the user's quiet window (UTC) when `moment` falls inside it, else None."""
    window = preferences.quiet_hours
    if window is None:
        return None
    start, end = quiet_hours.parse_wall_time(window.start), quiet_hours.parse_wall_time(window.end)
    return quiet_hours.window_end(moment, start, end, ZoneInfo(window.timezone))


def load(connection: Redis, user_id: str) -> Preferences:
    """The stored preferences, every channel listed (on unless turned off); defaults for a new user."""
    stored: dict[bytes, bytes] = connection.hgetall(key(user_id))  # type: ignore[assignment]
    return from_stored({name.decode(): json.loads(value) for name, value in stored.items()})


def from_stored(raw: dict[str, Any]) -> Preferences:
    """The preferences from their hash's fields, decoded; defaults for what is not there."""
    channels: dict[ChannelName, bool] = {channel: bool(raw.get(f"channel:{channel}", True)) for channel in CHANNELS}
    topics: dict[str, dict[ChannelName, bool]] = {}
    for name, value in raw.items():
        if name.startswith("topic:"):
            topic, _, channel = name.removeprefix("topic:").rpartition(":")
            topics.setdefault(topic, {})[cast(ChannelName, channel)] = bool(value)
    quiet = QuietHours(**raw["quiet_hours"]) if raw.get("quiet_hours") else None
    # Not validated again: unsubscribe links may have added topics beyond what one PUT may send.
    return Preferences.model_construct(channels=channels, topics=topics, quiet_hours=quiet)


def save(connection: Redis, user_id: str, preferences: Preferences) -> Preferences:
    """Replace all of a user's preferences (parts left out take their defaults) in one transaction."""
    with connection.pipeline() as pipeline:
        pipeline.delete(key(user_id))
        if fields := _fields(preferences):
            pipeline.hset(key(user_id), mapping=fields)
        pipeline.execute()
    return load(connection, user_id)


def set_topic_channel(connection: Redis, user_id: str, topic: str, channel: str, wanted: bool) -> None:
    """Turn one channel of one topic on or off, leaving every other preference as it is."""
    connection.hset(key(user_id), f"topic:{topic}:{channel}", json.dumps(wanted))


def _fields(preferences: Preferences) -> dict[EncodableT, EncodableT]:
    fields: dict[EncodableT, EncodableT] = {f"channel:{c}": json.dumps(on) for c, on in preferences.channels.items()}
    for topic, channels in preferences.topics.items():
        fields |= {f"topic:{topic}:{channel}": json.dumps(on) for channel, on in channels.items()}
    if preferences.quiet_hours:
        fields["quiet_hours"] = preferences.quiet_hours.model_dump_json()
    return fields
