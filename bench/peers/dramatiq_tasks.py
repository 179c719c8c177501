"""dramatiq actors on its Redis broker: `dramatiq bench.peers.dramatiq_tasks`."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.peers import common

dramatiq.set_broker(RedisBroker(url=common.REDIS_URL))


@dramatiq.actor(queue_name=common.QUEUE, max_retries=0)  # type: ignore[untyped-decorator]
def noop() -> None:
    """Do nothing."""


@dramatiq.actor(queue_name=common.QUEUE, max_retries=0)  # type: ignore[untyped-decorator]
def send_email(number: int) -> None:
    common.send_email(number)


@dramatiq.actor(queue_name=common.QUEUE, max_retries=0)  # type: ignore[untyped-decorator]
def deliver(number: int) -> None:
    common.deliver(number)


def enqueue(task: str, count: int) -> None:
    actor = {"noop": noop, "send_email": send_email, "deliver": deliver}[task]
    for number in range(count):
        actor.send(*(() if task == "noop" else (number,)))
