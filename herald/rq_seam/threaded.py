"""A worker process that runs several jobs at once, each in a thread: for deliveries, which wait on
the network (an SMTP server or a webhook receiver answering in 100 ms leaves a process idle 99% of it).

`ThreadedWorker` is `RecoveringSimpleWorker` (RQ's `SimpleWorker` with claimed pops and heartbeats from
a thread) whose main loop claims a job only when one of its `threads` is free, and hands it to that
thread. Each job is still one RQ execution: registered as started with its own heartbeat, retried with
backoff, recovered if the process dies (its claim or its expired heartbeat, as for any worker), and
visible in the registries and the dashboard. Jobs time out by an exception raised in the job's thread
(`WatchdogDeathPenalty`, RQ's `TimerDeathPenalty` with one timer thread per process instead of one per
job), since a signal reaches only the main thread. The threads are made once and take one job after
another. A warm shutdown (SIGTERM, SIGINT) stops the claiming and waits for the running jobs; so do the
end of a burst and a recycle.

Short jobs are not handed from thread to thread: the end script of a job that holds no destination slot
also pops and starts the next waiting job, which the same thread runs (one round trip per job), and the
main thread hands a job to another thread only once no job has been started so for `CHAIN_WAIT_SECONDS`
(the running ones wait on the network) or none runs. Handing the GIL between the claiming thread and the
job threads at each system call cost a no-op job more CPU than the job itself. While its threads take
the jobs so, the main thread keeps RQ's duties between two jobs: heartbeats, stops, suspension, maintenance.

RQ's built-in scheduler (retry delays) runs in a thread of the worker (`ThreadScheduler`), not in a
process forked for it: the same loop, locks and heartbeats, without a third process's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import heapq
import inspect
import itertools
import os
import queue
import sys
import threading
import time
from contextlib import suppress
from types import FrameType
from typing import Any

from redis.client import Pipeline
from rq import Queue
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.exceptions import StopRequested
from rq.job import Job
from rq.scheduler import RQScheduler, run
from rq.suspension import is_suspended
from rq.timeouts import TimerDeathPenalty
from rq.worker import BaseWorker, WorkerStatus

from herald.rq_seam import starts
from herald.rq_seam.recovery import RecoveringSimpleWorker, Wakeups

M_ARENA_MAX = -8
"""glibc's `mallopt` parameter: how many malloc arenas a process may make."""
MALLOC_ARENAS = 2
_WAITS_FOR_WORK = {threading.Semaphore.acquire.__code__, Wakeups.wait.__code__}
"""Where the main thread waits holding no claim (for a free thread, for a job to come): a stop may end it there."""
FREE_THREAD_WAIT_SECONDS = 1.0
CHAIN_WAIT_SECONDS = 0.005
"""How long the main thread leaves waiting jobs to a thread that takes them one after another, each in the
end script of its last (`ThreadedWorker._wait_for_the_chain`), before it hands one to another thread."""
STOP_CHECK_SECONDS = 1
"""How long the main loop waits for a free thread before it sends a heartbeat and looks again."""


class Watchdog:
    """One thread that fires the death penalties of a process's jobs when they are due.

    RQ's `TimerDeathPenalty` starts a `threading.Timer` (a thread) for every job and every callback;
    here each registers its deadline with this one thread, which sleeps until the earliest.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """No deadlines and no thread: as made, and in a forked child, which has none of its parent's
        threads (and may have been forked while one of them held the lock)."""
        self._due: list[tuple[float, int, TimerDeathPenalty]] = []
        self._canceled: set[int] = set()
        self._changed = threading.Condition()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, penalty: TimerDeathPenalty, seconds: float) -> int:
        """Fire `penalty` in `seconds` unless canceled; the token to cancel it with."""
        token = next(self._order)
        with self._changed:
            heapq.heappush(self._due, (time.monotonic() + seconds, token, penalty))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="job timeouts", daemon=True)
                self._thread.start()
            self._changed.notify()
        return token

    def cancel(self, token: int) -> None:
        with self._changed:
            self._canceled.add(token)

    def _run(self) -> None:
        """Fire each penalty when due, under the lock: a job whose `cancel` came first is never hit,
        and a pooled thread that has gone on to its next job never gets the last one's exception."""
        with self._changed:
            while True:
                penalty = self._wait_for_due()
                with suppress(ValueError):  # its thread has ended
                    penalty.handle_death_penalty()

    def _wait_for_due(self) -> TimerDeathPenalty:
        """Under the lock: wait until the earliest deadline not canceled passes; its penalty."""
        while True:
            while self._due and self._due[0][1] in self._canceled:
                self._canceled.discard(heapq.heappop(self._due)[1])
            wait = self._due[0][0] - time.monotonic() if self._due else None
            if wait is not None and wait <= 0:
                return heapq.heappop(self._due)[2]
            self._changed.wait(wait)


WATCHDOG = Watchdog()
if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=WATCHDOG.reset)


class WatchdogDeathPenalty(TimerDeathPenalty):
    """RQ's `TimerDeathPenalty` (an exception raised in the job's thread), its timer kept by `WATCHDOG`."""

    _token: int | None = None

    def setup_death_penalty(self) -> None:
        if self._timeout > 0:
            self._token = WATCHDOG.add(self, self._timeout)

    def cancel_death_penalty(self) -> None:
        if self._token is not None:
            WATCHDOG.cancel(self._token)
            self._token = None


def limit_malloc_arenas() -> None:
    """At most `MALLOC_ARENAS` malloc arenas in this process (glibc), unless MALLOC_ARENA_MAX says otherwise.

    glibc gives threads arenas of their own, up to 8 per core, each holding freed memory: a few MiB of
    resident memory for threads that mostly wait on the network and allocate little.
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    with suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def _waiting_for_work(frame: FrameType | None) -> bool:
    """Whether the interrupted main thread (`frame` and its callers) waits in one of `_WAITS_FOR_WORK`."""
    while frame is not None:
        if frame.f_code in _WAITS_FOR_WORK:
            return True
        frame = frame.f_back
    return False


class ThreadScheduler(RQScheduler):
    """RQ's scheduler in a thread: `start` runs RQ's loop in a daemon thread that stands for RQ's process
    (the worker asks it `is_alive()` to start a dead one again); the worker's main thread, which gets
    the signals, stops it with `request_stop`."""

    def start(self) -> threading.Thread:
        self._status = self.Status.STARTED
        self._stop_requested = False
        thread = threading.Thread(target=run, args=(self,), name="scheduler", daemon=True)
        self._process = thread  # type: ignore[assignment]
        thread.start()
        return thread

    def _install_signal_handlers(self) -> None:
        """None: only the main thread may install them, and the worker's own stop this thread."""

    def stop_thread(self) -> None:
        self.request_stop()
        if isinstance(self._process, threading.Thread) and self._process is not threading.current_thread():
            self._process.join()


class ThreadedWorker(RecoveringSimpleWorker):
    """Up to `threads` jobs at once in one process; otherwise RQ's `SimpleWorker` with our recovery."""

    death_penalty_class = WatchdogDeathPenalty
    threads = 8
    _cold = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        limit_malloc_arenas()
        super().__init__(*args, **kwargs)
        self._free = threading.BoundedSemaphore(self.threads)
        self._count_lock = threading.Condition()
        self._running = 0
        self._jobs: queue.SimpleQueue[tuple[Job, Queue] | None] = queue.SimpleQueue()
        self._pool: list[threading.Thread] = []
        self._state_written = threading.local()
        """`done`: whether this thread's last job end set the worker's state (`ended_in_script`); `popped`:
        the next job that end popped and started for this thread (`popped_with_end`)."""
        self._chaining_started_at = float("-inf")
        """When (monotonic) a job whose end may take the next (one holding no destination slot) last started."""
        self._chains = True
        """Whether a job's end takes the next: not within a `work(max_jobs=...)`, whose count is RQ's loop's,
        nor once the worker is leaving."""
        self._suspended = False
        """Whether the last look found the worker suspended (`before_suspension_check`)."""
        self._reserved = 0
        """Jobs counted in `jobs_run` before their pop, by a pop under way (`_reserve`)."""
        self._main_reserved = False
        """Whether the job the main thread's loop executes next was counted before its pop."""

    def set_threads(self, threads: int) -> None:
        """Run up to `threads` jobs at once (before `work`)."""
        self.threads = threads
        self._free = threading.BoundedSemaphore(threads)

    @property
    def dequeue_timeout(self) -> int:
        """An idle wait for a job is cut into waits this long, each after a heartbeat (`heartbeat` ends
        a stop that came while no wait could be cut short)."""
        return STOP_CHECK_SECONDS

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's (our lean one); on the main thread, the place where a stop deferred by `_shutdown` ends the
        loop: the main thread calls it before each claim and holds no claim then."""
        if self._stop_requested and threading.current_thread() is threading.main_thread():
            raise StopRequested()
        super().heartbeat(timeout, pipeline)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """A job is claimed only once a thread is free to run it, so none waits here, claimed. A burst
        that finds the queues empty looks again once its running jobs have ended, as RQ's one-job-at-a-
        time loop would: they may have queued more (their dependents)."""
        while True:
            result = self._claim_for_a_free_thread(timeout, max_idle_time)
            if result is not None or timeout is not None or not self._running:
                return result
            self.wait_for_jobs()

    def work(self, *args: Any, **kwargs: Any) -> bool:
        self._chains = inspect.signature(BaseWorker.work).bind(self, *args, **kwargs).arguments.get("max_jobs") is None
        return bool(super().work(*args, **kwargs))

    def _claim_for_a_free_thread(self, timeout: int | None, max_idle_time: int | None) -> tuple[Job, Queue] | None:
        self._wait_for_the_chain(burst=timeout is None)
        while not self._free.acquire(timeout=FREE_THREAD_WAIT_SECONDS):
            self._between_jobs(burst=timeout is None)
        if self._stop_requested or not self._reserve_for_main():  # not reserved: its share was taken, recycled
            self._free.release()
            raise StopRequested()
        try:
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        except BaseException:
            self._settle(popped=False)
            self._free.release()
            raise
        if result is None:
            self._settle(popped=False)
            self._free.release()
        self._main_reserved = result is not None
        return result

    def _reserve_for_main(self) -> bool:
        """`_reserve`, once the pops under way have settled where they hold the last of the share."""
        with self._count_lock:
            while not self._reserve():
                if not self._reserved:
                    return False
                self._count_lock.wait(FREE_THREAD_WAIT_SECONDS)
            return True

    def _reserve(self) -> bool:
        """Count a job about to be popped in `jobs_run`, so that the main thread's pops and the ends' pops
        together take no more than `max_jobs_per_process`; False if the share is taken."""
        with self._count_lock:
            if self.max_jobs_per_process and self.jobs_run >= self.max_jobs_per_process:
                return False
            self.jobs_run += 1
            self._reserved += 1
            return True

    def _settle(self, popped: bool) -> None:
        """A reserved pop is over: its job runs from now, or none came and the count is given back."""
        with self._count_lock:
            self._reserved -= 1
            if popped:
                self._running += 1
                self._recycle_if_due()
            else:
                self.jobs_run -= 1
            self._count_lock.notify_all()

    def _wait_for_the_chain(self, burst: bool) -> None:
        """While a thread takes the waiting jobs one after another (each popped by the end script of the one
        before: one round trip per job, and no hand-over of the GIL between two threads at each of its
        system calls), the main thread leaves them to it. It hands a job to another thread once none has
        started so for `CHAIN_WAIT_SECONDS` (the running jobs wait on something: the network), or none runs."""
        while self._running and (wait := self._chaining_started_at + CHAIN_WAIT_SECONDS - time.monotonic()) > 0:
            _leave_to_the_chain(wait)
            self._between_jobs(burst)

    def _between_jobs(self, burst: bool) -> None:
        """What RQ's loop does between two jobs, for a main thread that waits while its threads take the
        jobs: a heartbeat (where a stop ends the wait), the look for a suspension, maintenance."""
        self.heartbeat()
        self.check_for_suspension(burst)  # at most once a second
        if self.should_run_maintenance_tasks:
            self.run_maintenance_tasks()

    def before_suspension_check(self) -> None:
        """No job's end takes the next while the worker is suspended (`rq suspend`)."""
        self._suspended = is_suspended(self.connection, self)

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's look waits while the worker is suspended, then writes back the state from before (busy, if
        jobs ran then); a worker whose jobs all ended meanwhile is idle."""
        try:
            super().check_for_suspension(burst)
        finally:
            resumed, self._suspended = self._suspended, False
        if resumed and not self._running:
            self.set_state(WorkerStatus.IDLE)

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        """The worker is busy while any of its jobs runs: the `idle` RQ's loop writes before each claim
        (a round trip of the one claiming thread, and a flip the dashboard would show) waits until none does;
        a suspended worker stays `suspended` (RQ writes it once, then waits) when its last job ends."""
        if state == WorkerStatus.IDLE and pipeline is None and (self._running or self._suspended):
            return
        super().set_state(state, pipeline)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Hand the job to a free thread of the pool (made on first use). It counts towards
        `max_jobs_per_process` from before its pop (`_reserve`): the process claims no more than its share,
        and ends (once its jobs have) when it has claimed it."""
        with self._count_lock:
            if self._main_reserved:
                self._main_reserved = False
                self._settle(popped=True)
            else:  # a job given otherwise (RQ's tests call `execute_job`)
                self._running += 1
                self.jobs_run += 1
                self._recycle_if_due()
            if len(self._pool) < self.threads:
                thread = threading.Thread(target=self._serve_jobs, name=f"jobs {len(self._pool) + 1}", daemon=True)
                self._pool.append(thread)
                thread.start()
        if not job.rate_limit_key:
            self._chaining_started_at = time.monotonic()
        self._jobs.put((job, queue))

    def _serve_jobs(self) -> None:
        """A thread of the pool: run the jobs handed to it, one after another, until given None."""
        while (handed := self._jobs.get()) is not None:
            try:
                self._run(*handed)
            except Exception:  # a thread made per job would end here; a pooled one goes on
                self.log.exception("job %s: its run ended with an error its end does not record", handed[0].id)

    def idle_keys(self) -> list[str]:
        """A job's end sets the worker `idle` in its script when it leaves no job running: the script
        sees the execution index, which each start adds to in its own script, so a job started by the
        main thread meanwhile keeps the worker busy; and an idle worker costs no write of its own. None
        while the worker is suspended: it shows `suspended` until it is resumed."""
        return [] if self._suspended else [self.key, self.executions_key]

    def ended_in_script(self) -> None:
        self._state_written.done = True

    def next_start(self) -> starts.Start | None:
        """A successful job's end pops and starts the next waiting job, for the same thread to run, unless
        the worker is stopping or has claimed its share of jobs or memory."""
        if not self._chains or self._suspended or self._stop_requested or self.recycled:
            return None
        if self.recycle_reason() is not None or not self._reserve():
            return None
        return starts.Start(self)

    def popped_with_end(self, start: starts.Start, outcome: Any) -> Any:
        """A job popped by the end script runs next in the same thread, counted as running from now."""
        self._settle(popped=isinstance(outcome, list))
        if not isinstance(outcome, list):
            return outcome
        self._chaining_started_at = time.monotonic()
        self._state_written.popped = (outcome, start)
        return 1

    def _run(self, job: Job, queue: Queue) -> None:
        """Run the job handed to this thread, and each job the end of the one before popped for it."""
        try:
            handed: tuple[Job, Queue] | None = (job, queue)
            while handed is not None:
                handed = self._run_one(*handed)
        finally:
            try:
                self._give_back_unrun()
            finally:
                self._free.release()

    def _give_back_unrun(self) -> None:
        """A job popped for this thread that an error kept it from running: back at the front of its queue."""
        popped, self._state_written.popped = getattr(self._state_written, "popped", None), None
        if popped is not None:
            self._end_of_job()
            self.give_back(popped)

    def _run_one(self, job: Job, queue: Queue) -> tuple[Job, Queue] | None:
        ended = False
        self._state_written.done = False
        self._state_written.popped = None
        try:
            execution = self.prepare_execution(job)
            self.perform_job(job, queue, execution)
            idle = self._end_of_job()
            ended = True
            if idle and not self._state_written.done:
                self.set_state(WorkerStatus.IDLE)
        finally:
            if not ended:
                self._end_of_job()
        return self._popped_for_this_thread()

    def _popped_for_this_thread(self) -> tuple[Job, Queue] | None:
        """The job the end of this thread's last job popped and started, made from its hash; None if
        none was waiting, or it was deleted while queued (then it is counted out again)."""
        popped, self._state_written.popped = self._state_written.popped, None
        if popped is None:
            return None
        result = None
        try:
            result = self.job_popped_with_end(popped)
        finally:  # raised: as a pop's error, the job is dropped and its start undone (`_fetch_claimed`)
            if result is None:
                self._end_of_job()
        return result

    def _end_of_job(self) -> bool:
        """Count a job out; whether none runs now."""
        with self._count_lock:
            self._running -= 1
            self._recycle_if_due()
            self._count_lock.notify_all()
            return self._running == 0

    def _start_scheduler(
        self,
        burst: bool = False,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:
        """RQ's, with the scheduler in a thread (`ThreadScheduler`) instead of a forked process."""
        self.scheduler = ThreadScheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format,
            log_format=log_format,
            serializer=self.serializer,
        )
        self.scheduler.acquire_locks()
        if not self.scheduler.acquired_locks:
            return
        if not burst:
            self.scheduler.start()
            return
        try:  # a burst: what is due now, once, as RQ's does
            self.scheduler.register_birth()
            self.scheduler.enqueue_scheduled_jobs()
        finally:
            self.scheduler.release_locks()
            self.scheduler.register_death()

    def stop_scheduler(self) -> None:
        if isinstance(self.scheduler, ThreadScheduler):
            self.scheduler.stop_thread()

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
        dequeue, which RQ's loop would not leave: the signal ends the loop there at once. Anywhere else
        (between a claim and the start of its job's thread, say) the loop stops at its next heartbeat,
        before its next claim (within `STOP_CHECK_SECONDS`), so that no claimed job is left unstarted
        for the crash recovery.
        """
        self._stop_requested = True
        self.set_shutdown_requested_date()
        if self.scheduler:
            self.stop_scheduler()
        if _waiting_for_work(sys._getframe(1)):
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
        """Wait for the running jobs before the worker leaves the registry (warm shutdown); end the
        threads, so that the worker's next `work` (RQ's tests call it again) makes its own."""
        self._chains = False  # a StopRequested (a burst worker suspended) ends the loop without `_stop_requested`
        if not self._cold:
            self.wait_for_jobs()
            for _ in self._pool:
                self._jobs.put(None)
            for thread in self._pool:
                thread.join()
            self._pool.clear()
        super().teardown()

    def wait_for_jobs(self) -> None:
        with self._count_lock:
            self._count_lock.wait_for(lambda: self._running == 0)


def _leave_to_the_chain(seconds: float) -> None:
    """The main thread's wait while a job thread takes the jobs (`_wait_for_the_chain`): a stop may end it."""
    time.sleep(seconds)


_WAITS_FOR_WORK.add(_leave_to_the_chain.__code__)
