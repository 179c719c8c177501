"""Hooks where other modules report events for metrics; wired to counters by the metrics module.

Each hook is called by name (`metrics_hooks.record_rejection(...)`), so replacing the function here
(or assigning a new one at start-up) takes effect everywhere.
"""

from __future__ import annotations

from herald.infra import connections, metrics


def record_rejection(queue: str) -> None:
    """A submission to `queue` was refused because the queue is full (429): `queue_rejected_total{queue}`."""
    metrics.rejected(connections.redis_client(), queue)
