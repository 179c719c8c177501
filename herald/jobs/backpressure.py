"""Backpressure: new work is refused (`QueueFullError`, a 429) once a queue holds `QUEUE_MAX_WAITING`
waiting jobs.

Each process keeps its last look at each queue's length and what it added since, so that a busy API
reads the length again only when it may be near the limit.
"""

from __future__ import annotations

import asyncio
import time

from rq import Queue

from herald.exceptions import QueueFullError
from herald.infra import connections, metrics_hooks
from herald.rq_seam import limits
from settings import Settings

_known_lengths: dict[str, tuple[float, int]] = {}
"""Queue name -> (monotonic time read, length): this process's last look at each queue."""
LENGTH_FRESH_SECONDS = 0.5


def ensure_capacity(settings: Settings, queue: Queue) -> None:
    """Refuse new work once `queue` holds `QUEUE_MAX_WAITING` waiting jobs, counting those waiting for
    a destination slot (`limits.waiting`).

    The length (one script) is read again only when the last look is older than half a second or was
    within a tenth of the limit, so a busy API skips that round trip while the queue is far from full.
    """
    if _length_is_stale(settings, queue.name):
        _known_lengths[queue.name] = (time.monotonic(), limits.waiting(queue))
    if _is_full(settings, queue.name):
        metrics_hooks.record_rejection(queue.connection, queue.name)
        raise _queue_full(settings, queue.name)


async def ensure_capacity_async(settings: Settings, queue: Queue) -> None:
    """`ensure_capacity` through the asyncio client."""
    if _length_is_stale(settings, queue.name):
        waiting = await limits.waiting_async(connections.async_redis_client(settings), queue)
        _known_lengths[queue.name] = (time.monotonic(), waiting)
    if _is_full(settings, queue.name):
        await asyncio.to_thread(metrics_hooks.record_rejection, queue.connection, queue.name)
        raise _queue_full(settings, queue.name)


def count_own_enqueue(queue_name: str, count: int = 1) -> None:
    """Keep this process's last look at the queue's length up to date with what it adds itself."""
    if queue_name in _known_lengths:
        read_at, waiting = _known_lengths[queue_name]
        _known_lengths[queue_name] = (read_at, waiting + count)


def _length_is_stale(settings: Settings, queue_name: str) -> bool:
    read_at, waiting = _known_lengths.get(queue_name, (0.0, 0))
    near_limit = waiting >= settings.queue_max_waiting * 0.9
    return near_limit or time.monotonic() - read_at > LENGTH_FRESH_SECONDS


def _is_full(settings: Settings, queue_name: str) -> bool:
    return _known_lengths[queue_name][1] >= settings.queue_max_waiting


def _queue_full(settings: Settings, queue_name: str) -> QueueFullError:
    return QueueFullError(queue_name, _known_lengths[queue_name][1], settings.queue_full_retry_after_seconds)
