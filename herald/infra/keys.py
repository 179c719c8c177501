"""Every Redis key of the service, in one place; RQ's and rq-scheduler's through their own constants.

`PREFIX` starts every key of ours. It is empty: the keys keep the names the service has always
written, so that the data already in Redis (records, inboxes, preferences, markers of sent jobs) is
found after an upgrade. A non-empty prefix (for example `herald:`) would need a migration that
renames the existing keys first; the key names below are the only place to change.
"""

from __future__ import annotations

from rq.worker_registration import REDIS_WORKER_KEYS
from rq_scheduler import Scheduler

PREFIX = ""
"""The start of every key of ours (empty: see the module's docstring)."""

DELAYED_JOBS = str(Scheduler.scheduled_jobs_key)
"""rq-scheduler's sorted set of delayed jobs, scored by due time (Unix seconds, kept with fractions)."""
WORKERS = REDIS_WORKER_KEYS
"""RQ's set of registered workers."""


def _key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


METRICS_PREFIX = _key("metrics", "")
"""Counters and histograms: `metrics:<name>`."""
RECOVERY_CLAIMS = _key("recovery", "claims")
"""Jobs claimed by workers as they were popped (the crash recovery's hash)."""
REPLICATION_FENCE = _key("replication", "fence")


def notification(notification_id: str) -> str:
    return _key("notification", notification_id)


def delivery(delivery_id: str) -> str:
    return _key("delivery", delivery_id)


def contact(user_id: str) -> str:
    return _key("user", user_id)


def preferences(user_id: str) -> str:
    return _key("preferences", user_id)


def inbox(user_id: str) -> str:
    """The start of a user's inbox keys (`:ids`, `:unread`, `:items`, `:seq`, `:events`); the braces
    keep one user's keys in one Redis Cluster slot."""
    return _key("inbox", f"{{{user_id}}}")


def digest_pointer(user_id: str, channel: str, digest_key: str) -> str:
    return _key("digest", "open", user_id, channel, digest_key)


def digest(digest_id: str) -> str:
    return _key("digest", digest_id)


def digest_items(digest_id: str) -> str:
    return _key("digest", digest_id, "items")


def idempotency(scope: str, key: str) -> str:
    return _key("idempotency", scope, key)


def sent(job_id: str) -> str:
    """The marker a job leaves once its message went out, so a re-run sends nothing."""
    return _key("sent", job_id)


def periodic_run(name: str, due_iso: str) -> str:
    """The claim of one run of a periodic job."""
    return _key("periodic", "run", name, due_iso)


def webhook_limit(host: str) -> str:
    """RQ `RateLimit` key of deliveries to one webhook host (RQ puts its own `rq:rl:` before it)."""
    return _key("webhook", host)


def smtp_limit(host: str, port: int) -> str:
    return _key("smtp", host, str(port))
