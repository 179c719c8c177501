"""huey tasks on Redis: `huey_consumer bench.peers.huey_tasks.huey`."""

from __future__ import annotations

from huey import RedisHuey

from bench.peers import common

huey = RedisHuey(common.QUEUE, url=common.REDIS_URL, results=False)


@huey.task()  # type: ignore[untyped-decorator]
def noop() -> None:
    """Do nothing."""


@huey.task()  # type: ignore[untyped-decorator]
def send_email(number: int) -> None:
    common.send_email(number)


def enqueue(task: str, count: int) -> None:
    for number in range(count):
        noop() if task == "noop" else send_email(number)
