"""Structured logs: one JSON object per line on stderr, with the running job's context and no secrets.

`setup_logging(level)` is called by every entry point (the API at import, `worker.py`, `scheduler.py`).
Each line has `ts`, `level`, `logger` and `message`, plus those of `EXTRA_FIELDS` that are known: in a
work-horse the current job's id, task, queue, attempt and correlation id; in a delivery's log lines its
delivery id, channel and outcome. Secret values from the settings are replaced by `[REDACTED]`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr
from rq import get_current_job
from rq.job import Job

from settings import Settings, get_settings

EXTRA_FIELDS = ("job_id", "task", "queue", "attempt", "delivery_id", "correlation_id", "channel", "outcome", "error")
REDACTED = "[REDACTED]"
SECRET_NAME = re.compile(r"password|secret|token|(^|_)keys?$")
"""Plain `str` settings with such names are secrets too (`SecretStr` ones always are)."""
THIRD_PARTY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
"""Loggers that come with handlers of their own: they are sent through ours instead."""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {name: getattr(record, name) for name in EXTRA_FIELDS if getattr(record, name, None) is not None}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


def job_fields(job: Job) -> dict[str, Any]:
    """What a log line says about the job it was written in."""
    fields = {
        "job_id": job.id,
        "task": job.meta.get("task") or job.func_name,
        "queue": job.origin,
        "correlation_id": job.meta.get("correlation_id"),
    }
    if job.retry_intervals and job.retries_left is not None:  # our jobs: one interval per retry
        fields["attempt"] = len(job.retry_intervals) - job.retries_left + 1
    return fields


class JobContext(logging.Filter):
    """Adds the current RQ job's fields (in a work-horse, while the job runs) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = get_current_job()
        if job is not None:
            for name, value in job_fields(job).items():
                if getattr(record, name, None) is None:
                    setattr(record, name, value)
        return True


def secret_values(settings: Settings) -> list[str]:
    """Every secret in the settings, longest first (so no part of a longer one is left)."""
    found: set[str] = set()
    for name, value in settings:
        found.update(_secrets_in(name, value))
    found.add(urlsplit(settings.redis_url).password or "")
    found |= {secret.removeprefix("whsec_") for secret in found}  # the key inside a Standard Webhooks secret
    return sorted((secret for secret in found if secret), key=len, reverse=True)


def _secrets_in(name: str, value: object, secret: bool = False) -> Iterable[str]:
    """Secrets: `SecretStr` values, and strings in a setting named like a secret; keys may be comma-separated."""
    secret = secret or bool(SECRET_NAME.search(name))
    if isinstance(value, SecretStr):
        yield from _secrets_in(name, value.get_secret_value(), secret=True)
    elif isinstance(value, str) and secret:
        yield value
        if name.endswith("keys"):
            yield from (part.strip() for part in value.split(","))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _secrets_in(name, key, secret)
            yield from _secrets_in(name, item, secret)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _secrets_in(name, item, secret)


class RedactSecrets(logging.Filter):
    """Replaces every secret value of the settings in the message, the traceback and the extra fields."""

    def __init__(self) -> None:
        super().__init__()
        self._settings: Settings | None = None
        self._secrets: list[str] = []
        self._loading = threading.local()

    def secrets(self) -> list[str]:
        if getattr(self._loading, "active", False):  # a record logged while the settings load (python-dotenv)
            return self._secrets
        self._loading.active = True
        try:
            settings = get_settings()
        except Exception:  # invalid settings: keep the secrets known so far (the process fails elsewhere)
            return self._secrets
        finally:
            self._loading.active = False
        if settings is not self._settings:
            self._settings, self._secrets = settings, secret_values(settings)
        return self._secrets

    def redact(self, text: str) -> str:
        for secret in self.secrets():
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, self.redact(value))
        return True


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at the time (tools and tests replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: str | int = "INFO") -> logging.Handler:
    """Send every log record of the process, at `level` or above, as JSON lines to stderr."""
    handler = StderrHandler()
    handler.setLevel(level)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(JobContext())
    handler.addFilter(RedactSecrets())
    handler.set_name("json")
    root = logging.getLogger()
    for old in [old for old in root.handlers if old.get_name() == "json"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.handlers:  # one uvicorn turned off (`--no-access-log`) has none: it stays off
            logger.handlers.clear()
            logger.propagate = True
    return handler
