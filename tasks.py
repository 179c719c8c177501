"""The job functions and the registry clients pick them from by name.

Only functions in `TASKS` can be enqueued through the API; a name from a request is
looked up here and never handed to RQ, which would import any dotted path it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from channels import email
from schemas import EmailArgs, NoArgs
from settings import get_settings


def send_email(to: str, subject: str, body: str) -> dict[str, str]:
    """Send one email over SMTP and return its Message-ID."""
    settings = get_settings()
    message = email.build_message(settings, to, subject, body)
    email.send(settings, message)
    return {"to": to, "message_id": str(message["Message-ID"])}


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
