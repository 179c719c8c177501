"""Hooks where other modules report events for metrics; wired to counters by the metrics module.

Each hook is called by name (`metrics_hooks.record_rejection(...)`), so replacing the function here
(or assigning a new one at start-up) takes effect everywhere.
"""

from __future__ import annotations

from redis import Redis

from herald.infra import metrics


def record_rejection(connection: Redis, queue: str) -> None:
    """A submission to `queue` was refused because the queue is full (429): `queue_rejected_total{queue}`."""
    metrics.rejected(connection, queue)
