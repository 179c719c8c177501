"""A worker process that runs several jobs at once, each in a thread: for deliveries, which wait on
the network (an SMTP server or a webhook receiver answering in 100 ms leaves a process idle 99% of it).

`ThreadedWorker` is `RecoveringSimpleWorker` (RQ's `SimpleWorker` with claimed pops and heartbeats from
a thread) whose main loop claims a job only when one of its `threads` is free, and hands it to that
thread. Each job is still one RQ execution: registered as started with its own heartbeat, retried with
backoff, recovered if the process dies (its claim or its expired heartbeat, as for any worker), and
visible in the registries and the dashboard. Jobs time out by `TimerDeathPenalty` (an exception raised
in the job's thread), since a signal reaches only the main thread. A warm shutdown (SIGTERM, SIGINT)
stops the claiming and waits for the running jobs; so do the end of a burst and a recycle.
"""

from __future__ import annotations

import threading
from types import FrameType
from typing import Any

from rq import Queue
from rq.exceptions import StopRequested
from rq.job import Job
from rq.timeouts import TimerDeathPenalty
from rq.worker import WorkerStatus

from herald.rq_seam.recovery import RecoveringSimpleWorker

FREE_THREAD_WAIT_SECONDS = 1.0
"""How long the main loop waits for a free thread before it sends a heartbeat and looks again."""


class ThreadedWorker(RecoveringSimpleWorker):
    """Up to `threads` jobs at once in one process; otherwise RQ's `SimpleWorker` with our recovery."""

    death_penalty_class = TimerDeathPenalty
    threads = 8
    _cold = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._free = threading.BoundedSemaphore(self.threads)
        self._count_lock = threading.Lock()
        self._running: set[threading.Thread] = set()

    def set_threads(self, threads: int) -> None:
        """Run up to `threads` jobs at once (before `work`)."""
        self.threads = threads
        self._free = threading.BoundedSemaphore(threads)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """A job is claimed only once a thread is free to run it, so none waits here, claimed."""
        while not self._free.acquire(timeout=FREE_THREAD_WAIT_SECONDS):
            self.heartbeat()
        try:
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        except BaseException:
            self._free.release()
            raise
        if result is None:
            self._free.release()
        return result

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Start the job in a thread. It counts towards `max_jobs_per_process` now: the process claims
        no more than its share, and ends (once its jobs have) when it has claimed it."""
        thread = threading.Thread(target=self._run, args=(job, queue), name=f"job {job.id}", daemon=True)
        with self._count_lock:
            self._running.add(thread)
            self.jobs_run += 1
            self._recycle_if_due()
        thread.start()

    def _run(self, job: Job, queue: Queue) -> None:
        try:
            execution = self.prepare_execution(job)
            self.perform_job(job, queue, execution)
            with self._count_lock:
                self._running.discard(threading.current_thread())
                idle = not self._running
                self._recycle_if_due()
            if idle:
                self.set_state(WorkerStatus.IDLE)
        finally:
            with self._count_lock:
                self._running.discard(threading.current_thread())
            self._free.release()

    def _recycle_if_due(self) -> None:
        """RecoveringSimpleWorker's recycling (its share of jobs, or of memory), under the count lock."""
        reason = self.recycle_reason()
        if reason and not self.recycled:
            self.log.info("worker %s: %s; it stops so that a fresh process takes its place", self.name, reason)
            self.recycled = self._stop_requested = True

    def _shutdown(self) -> None:
        """Warm shutdown: stop claiming at once, then (`teardown`) wait for the running jobs.

        RQ's raises `StopRequested` from the signal handler only when idle, and else lets the current
        job end and the loop notice; here the main thread runs no job but may wait for one in the
        dequeue, which RQ's loop would not leave, so the signal always ends the loop.
        """
        self._stop_requested = True
        self.set_shutdown_requested_date()
        if self.scheduler:
            self.stop_scheduler()
        raise StopRequested()

    def request_force_stop(self, signum: int, frame: FrameType | None) -> None:
        """Cold shutdown (a second signal): leave without waiting; the jobs' heartbeats expire and the
        crash recovery runs them again, as after a kill."""
        try:
            super().request_force_stop(signum, frame)  # returns when it takes the signal for a duplicate
        except SystemExit:
            self._cold = True
            raise

    def teardown(self) -> None:
        """Wait for the running jobs before the worker leaves the registry (warm shutdown)."""
        if not self._cold:
            self.wait_for_jobs()
        super().teardown()

    def wait_for_jobs(self) -> None:
        while True:
            with self._count_lock:
                running = next(iter(self._running), None)
            if running is None:
                return
            running.join()
