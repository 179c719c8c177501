"""celery tasks on Redis: `celery -A bench.peers.celery_tasks worker`."""

from __future__ import annotations

from celery import Celery

from bench.peers import common

app = Celery("bench", broker=common.REDIS_URL)
app.conf.task_default_queue = common.QUEUE
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False


@app.task  # type: ignore[untyped-decorator]
def noop() -> None:
    """Do nothing."""


@app.task  # type: ignore[untyped-decorator]
def send_email(number: int) -> None:
    common.send_email(number)


def enqueue(task: str, count: int) -> None:
    for number in range(count):
        noop.delay() if task == "noop" else send_email.delay(number)
