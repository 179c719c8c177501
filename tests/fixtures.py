"""Job bodies for tests: enqueued by the tests directly, never reachable through the API."""

from __future__ import annotations

import time

from exceptions import PermanentError, TransientError


def fail_permanently() -> None:
    raise PermanentError("recipient rejected")


def fail_transiently() -> None:
    raise TransientError("server busy")


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
