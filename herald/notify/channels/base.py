"""The message every channel function receives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from settings import Settings


@dataclass(frozen=True)
class Message:
    """What one delivery sends: content rendered and target resolved when the request came in."""

    delivery_id: str
    notification_id: str
    user_id: str
    title: str
    body: str
    target: str | None = None
    """The email address or webhook URL; None for channels that need none (in_app)."""
    payload: dict[str, Any] = field(default_factory=dict)
    """Extra JSON for machine receivers (the webhook body's `data`): source entity, template output."""
    created_at: str = ""
    """ISO-8601 time the notification was created."""
    correlation_id: str = ""
    html: str | None = None
    """Email only: the HTML alternative of `body` (a template's `email_body.html`)."""
    topic: str = "general"
    """What it is about: the user's preferences for this topic apply, and its emails' unsubscribe link names it."""
    required: bool = False
    """Sent whatever the user opted out of; its emails carry no unsubscribe link."""


Channel = Callable[["Settings", Message], None]
"""Deliver one message with the service's settings; raise `TransientError` (retry) or `PermanentError`
(give up) when not delivered."""
