"""The retry policy of every job: exponential backoff with jitter, as RQ's `Retry`.

What stops retries early (a `PermanentError`) is the failure callback's, in `queues`.
"""

from __future__ import annotations

import random

from rq import Retry

from settings import Settings

_JITTER = random.Random()
"""The jitter's source (a new `random.Random()` per job would read the OS's entropy pool each time)."""


def backoff_intervals(settings: Settings, rng: random.Random | None = None, retries: int | None = None) -> list[int]:
    """Exponential backoff with jitter: `min(base * 2**n, cap)`, plus up to `jitter` of it.

    RQ only takes a list of delays, so the list is computed here, once per job.
    """
    rng = rng or _JITTER
    delays = []
    for attempt in range(settings.retry_max if retries is None else retries):
        delay = min(settings.retry_base_seconds * 2**attempt, settings.retry_cap_seconds)
        delays.append(round(delay * (1 + rng.uniform(0, settings.retry_jitter))))
    return delays


def retry_policy(settings: Settings, retries: int | None = None) -> Retry | None:
    """RQ's `Retry` with our backoff; `retries` defaults to `RETRY_MAX`. None when no retries."""
    retries = settings.retry_max if retries is None else retries
    return Retry(max=retries, interval=backoff_intervals(settings, retries=retries)) if retries else None
