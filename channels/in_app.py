"""In-app channel (placeholder until implemented)."""

from channels.base import Message


def send(message: Message) -> None:
    raise NotImplementedError
