"""The project's classes that stand in for RQ's in RQ's own tests: the one file naming project modules.

When the project's modules move, only these imports change.
"""

from __future__ import annotations

from herald.rq_seam.recovery import CLAIMS_KEY, ClaimingQueue, RecoveringSimpleWorker, RecoveringWorker
from herald.rq_seam.threaded import ThreadedWorker

WORKER = RecoveringWorker
"""Stands in for `rq.Worker` (RQ's forking worker; the project's with WORKER_CLASS=fork)."""
SIMPLE_WORKER = RecoveringSimpleWorker
"""Stands in for `rq.SimpleWorker` (the project's default worker, WORKER_THREADS=1)."""
THREADED_WORKER = ThreadedWorker
"""Stands in for `rq.SimpleWorker` when RQ_UPSTREAM_SIMPLE_WORKER=threaded (WORKER_THREADS > 1)."""
QUEUE = ClaimingQueue
"""Stands in for `rq.Queue`: the class of the queues our workers make from names and pop from."""

__all__ = ["CLAIMS_KEY", "QUEUE", "SIMPLE_WORKER", "THREADED_WORKER", "WORKER"]
