"""The statuses the service itself writes: stored in Redis and returned in JSON, so their values never change.

RQ's own job statuses (`queued`, `started`, `finished`, ...) are `rq.job.JobStatus`; `JobState` holds
only the ones the service adds to them.
"""

from __future__ import annotations

from enum import StrEnum


class DeliveryStatus(StrEnum):
    """Where one channel delivery of a notification stands."""

    PENDING = "pending"
    SCHEDULED = "scheduled"
    SENDING = "sending"
    DELIVERED = "delivered"
    RETRYING = "retrying"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELED = "canceled"
    SKIPPED = "skipped"
    DIGESTED = "digested"


OPEN_DELIVERY_STATUSES = frozenset({DeliveryStatus.PENDING, DeliveryStatus.SCHEDULED, DeliveryStatus.RETRYING})
"""Deliveries that can still be canceled: not sending, not settled."""


class JobState(StrEnum):
    """Job statuses the API reports beyond RQ's `JobStatus`."""

    WAITING = "waiting"
    """A parked job waiting for `complete_job` (RQ calls it deferred)."""
    EXPIRED = "expired"
    """RQ has deleted the job (after its result or failure TTL)."""
    UNKNOWN = "unknown"
