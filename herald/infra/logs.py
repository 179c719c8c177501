"""Logs on stderr, for people (`console`) or for machines (`json`), with the job's context and no secrets.

Every entry point sets them up through `setup_logging_from(settings)`: the API at import (and uvicorn's
supervisor through `--log-config uvicorn_logging.json`), `worker.py`, `scheduler.py`. Every record of the
process goes through one handler, RQ's and uvicorn's own too. `LOG_FORMAT=json` writes one object per line
with `ts`, `level`, `logger` and `message`; `LOG_FORMAT=console` writes the time, level, process id, logger
and message. Both add those of `EXTRA_FIELDS` that are known: in a work-horse the current job's id, task,
queue, attempt and correlation id; in a delivery's log lines its delivery id, channel and outcome. Secret
values from the settings are replaced by `[REDACTED]`. RQ's periodic registry cleaning is logged at DEBUG.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import SecretStr

from settings import Settings, get_settings

if TYPE_CHECKING:
    from rq.job import Job

EXTRA_FIELDS = ("job_id", "task", "queue", "attempt", "delivery_id", "correlation_id", "channel", "outcome", "error")
REDACTED = "[REDACTED]"
SECRET_NAME = re.compile(r"password|secret|token|(^|_)keys?$")
"""Plain `str` settings with such names are secrets too (`SecretStr` ones always are)."""
THIRD_PARTY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
"""Loggers that come with handlers of their own: they are sent through ours instead."""
HANDLER_NAME = "service"
"""Our handler's name, also its key in `uvicorn_logging.json`: set up again, it replaces the one before."""
MAINTENANCE = re.compile(r"cleaning (group )?registries", re.IGNORECASE)
"""RQ's worker logs each registry-cleaning pass (every maintenance interval) at INFO."""
ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")
"""RQ colours queue names and job ids when stdout is a terminal."""
LogFormat = Literal["console", "json"]


def known_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {name: value for name in EXTRA_FIELDS if (value := getattr(record, name, None)) is not None}


class JsonFormatter(logging.Formatter):
    _encoder = json.JSONEncoder(default=str, ensure_ascii=False)
    """Made once: `json.dumps` with options makes an encoder for every line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": ANSI_COLOR.sub("", record.getMessage()),
        }
        entry |= known_fields(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = record.stack_info
        return self._encoder.encode(entry)


class ConsoleFormatter(logging.Formatter):
    """`12:00:01.234 INFO    4242 rq.worker: message job_id=... queue=default`, then any traceback."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)-7s %(process)d %(name)s: %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The fields end the message's first line (RQ logs a failed job's traceback in its message)."""
        first, newline, rest = super().formatMessage(record).partition("\n")
        fields = "".join(f" {name}={_logfmt(value)}" for name, value in known_fields(record).items())
        return first + fields + newline + rest


def _logfmt(value: object) -> str:
    """A value as is, or quoted when it is empty or holds a space, a quote or an equals sign."""
    text = str(value)
    return text if text and not re.search(r'[\s"=]', text) else json.dumps(text, ensure_ascii=False)


FORMATTERS: dict[LogFormat, type[logging.Formatter]] = {"console": ConsoleFormatter, "json": JsonFormatter}


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
        rq = sys.modules.get("rq")  # not loaded, no job: uvicorn's supervisor logs without loading RQ (9 MiB)
        job = rq.get_current_job() if rq is not None else None
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

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = list(secrets)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
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


class MaintenanceAtDebug(logging.Filter):
    """Lowers RQ's periodic registry-cleaning lines to DEBUG (a logger filter: it runs before the handler's level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and MAINTENANCE.search(str(record.msg)):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


MAINTENANCE_AT_DEBUG = MaintenanceAtDebug()


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at the time (tools and tests replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def log_format_for(settings: Settings) -> LogFormat:
    """`LOG_FORMAT` if set; otherwise console for a person (stderr a terminal, or local use), else JSON."""
    if settings.log_format != "auto":
        return settings.log_format
    on_terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return "console" if on_terminal or settings.environment == "local" else "json"


def setup_logging_from(settings: Settings) -> logging.Handler:
    return setup_logging(settings.log_level, log_format_for(settings), secret_values(settings))


def uvicorn_handler() -> logging.Handler:
    """For uvicorn's `--log-config uvicorn_logging.json`: its supervisor imports no app, so it is set up
    here. An entry point: it reads the settings itself."""
    return setup_logging_from(get_settings())


def setup_logging(
    level: str | int = "INFO", log_format: LogFormat = "json", secrets: Iterable[str] = ()
) -> logging.Handler:
    """Send every log record of the process, at `level` or above, to stderr in `log_format`, with
    `secrets` (`secret_values` of the settings) replaced by `[REDACTED]`."""
    logging.logMultiprocessing = logging.logThreads = False  # fields no format of ours writes
    logging._srcfile = None  # no caller's file and line looked up for each record: no format writes them
    handler = StderrHandler()
    handler.setLevel(level)
    handler.setFormatter(FORMATTERS[log_format]())
    handler.addFilter(JobContext())
    handler.addFilter(RedactSecrets(secrets))
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in [old for old in root.handlers if old.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("rq.worker").addFilter(MAINTENANCE_AT_DEBUG)
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.handlers:  # one uvicorn turned off (`--no-access-log`) has none: it stays off
            logger.handlers.clear()
            logger.propagate = True
    return handler
