"""RQ's `WorkerPool`, changed to run our workers and to replace processes in burst mode too."""

from __future__ import annotations

import logging
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

from rq.worker import BaseWorker
from rq.worker_pool import ForkProcess, WorkerData, WorkerPool

from herald.infra.supervisor import Ending

log = logging.getLogger("worker")


class Pool(WorkerPool):
    """RQ's pool of worker processes, each running `serve` (our worker classes and their settings).

    RQ's pool replaces no process in burst mode; this one replaces a recycled or crashed one, as the queues
    may still hold jobs, until each has ended by finding them empty (`drained`).
    """

    unfinished: tuple[int | None, ...] = ()
    """Exit statuses of the processes that ended without finding the queues empty or being recycled."""

    def __init__(self, *args: Any, serve: Callable[[bool], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.serve = serve
        """What each process runs, given `burst`: one of our workers, ending with an `Ending` status."""

    def get_worker_process(self, name: str, burst: bool, _sleep: float = 0, logging_level: str = "INFO") -> BaseProcess:
        """RQ's own starts a stock worker from the pool's settings; ours runs `serve`."""
        return ForkProcess(target=self.serve, args=(burst,), name=f"worker {name}")

    def handle_dead_worker(self, worker_data: WorkerData) -> None:
        """RQ's own forgets the process; in burst mode ours also starts a new one unless it drained."""
        super().handle_dead_worker(worker_data)
        status = worker_data.process.exitcode
        if not self._burst or status == Ending.DRAINED:
            return
        if status != Ending.RECYCLED:
            log.error("worker process %d ended with status %s before the queues were empty", worker_data.pid, status)
            self.unfinished += (status,)
        if status not in (Ending.UNAVAILABLE, Ending.STOPPED) and self.status != self.Status.STOPPED:
            self.start_worker(burst=True)

    @property
    def drained(self) -> bool:
        """After a burst: whether every process ended by finding the queues empty (or was replaced)."""
        return self.status != self.Status.STOPPED and not self.unfinished


def asked_to_stop(worker: BaseWorker | None) -> bool:
    """SIGTERM or SIGINT: RQ notes `_stop_requested` only when it comes during a job, the date always."""
    return worker is not None and worker._shutdown_requested_date is not None
