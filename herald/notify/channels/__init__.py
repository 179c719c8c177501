"""Delivery channels: one module per channel, one function each, one line in `CHANNELS`.

A channel function takes the settings and the `Message` of one delivery and returns once it is delivered; it
raises `exceptions.TransientError` (worth retrying) or `exceptions.PermanentError` otherwise.
"""

from herald.notify.channels import email, in_app, webhook
from herald.notify.channels.base import Channel, Message

CHANNELS: dict[str, Channel] = {
    "email": email.send_notification,
    "webhook": webhook.send,
    "in_app": in_app.send,
}

__all__ = ["CHANNELS", "Channel", "Message"]
