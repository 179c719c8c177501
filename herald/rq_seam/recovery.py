"""Crash recovery: a job whose worker was killed (SIGKILL, OOM, lost machine) runs again, or fails.

RQ finds such a job only when a maintenance pass cleans the queue's started-job registry, after the
job's heartbeat there has expired. A forking worker refreshes that heartbeat every
`job_monitoring_interval` (RQ: 30 s) with a TTL of that interval plus a hard-coded 60 s, and
maintenance runs every 10 minutes: a killed job was found 60 s to 11.5 min after the kill. Here:

- the worker heartbeats every `JOB_HEARTBEAT_SECONDS` with a TTL of that plus
  `JOB_HEARTBEAT_GRACE_SECONDS` (`RecoveringWorker.get_heartbeat_ttl`), and `sweep` cleans the
  started-job registries every `RECOVERY_SWEEP_SECONDS` from the scheduler process, so that a killed
  job is found at most heartbeat + grace + sweep seconds after the kill even with no worker alive;
- RQ pops a job (BLPOP) and registers it as started only after fetching it, and marks it `started`
  only in the work-horse, after the fork. Killed in between, the job is in no queue and no registry,
  or in the registry with status `queued`, which the registry's cleanup skips: it is lost. Here the pop
  and a record in `CLAIMS_KEY` are one Lua script; the record is removed in the transaction that
  registers the job and sets it `started`; `sweep` puts back jobs claimed more than
  `JOB_HEARTBEAT_GRACE_SECONDS` ago and still `queued`.
  Redis has no blocking pop-and-record over several lists, so an idle worker waits for a keyspace
  notification of a push onto one of its queues (`Wakeups`), or polls every `POLL_SECONDS` where
  the server's `notify-keyspace-events` lacks them.

A job found abandoned gets RQ's treatment (its failure callback sees `AbandonedJobError`; it is
retried while it has retries left, else moved to the failed registry) with one change: it goes back
to the front of its queue at once, without the backoff delay, which is for failing services, not dead
workers. A delayed retry would also wait for RQ's scheduler lock, which a killed worker holds for 61 s.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from redis import Redis
from redis.client import Pipeline, PubSub
from redis.exceptions import RedisError, ResponseError
from rq import Queue, SimpleWorker, Worker, worker_registration
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry, clean_registries
from rq.serializers import Serializer
from rq.timeouts import BaseDeathPenalty, JobTimeoutException
from rq.utils import now
from rq.worker import BaseWorker, WorkerStatus
from rq.worker_registration import clean_worker_registry

from settings import QUEUE_NAMES, get_settings

log = logging.getLogger("recovery")

CLAIMS_KEY = "recovery:claims"
"""Sorted set: ids of jobs popped by a worker and not yet registered as started, scored by pop time."""
MAINTENANCE_LOCK_SECONDS = 10
"""RQ's lock on a queue's registry cleaning lasts 899 s: a worker killed while cleaning would stop
every cleaning of that queue, ours included, for 15 minutes. A pass takes milliseconds."""
POLL_SECONDS = 0.05
"""How often an idle worker looks for jobs where Redis sends no keyspace notifications."""
WAKEUP_FALLBACK_SECONDS = 1.0
"""How often an idle worker looks anyway where it does: a notification lost with a dropped connection
delays a job by at most this."""

CLAIM_SCRIPT = """
local now = redis.call('TIME')[1]
for i = 2, #KEYS do
  local job_id = redis.call('LPOP', KEYS[i])
  if job_id then
    redis.call('ZADD', KEYS[1], now, job_id)
    return {KEYS[i], job_id}
  end
end
return false
"""
"""Pop the first job of the first non-empty queue (KEYS[2..], in priority order) and claim it."""

RECOVER_SCRIPT = """
local cutoff = tonumber(redis.call('TIME')[1]) - tonumber(ARGV[1])
local recovered = {}
for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)) do
  local job_key = ARGV[2] .. job_id
  if redis.call('HGET', job_key, 'status') == 'queued' then
    local queue_key = ARGV[3] .. redis.call('HGET', job_key, 'origin')
    if not redis.call('LPOS', queue_key, job_id) then
      redis.call('LPUSH', queue_key, job_id)
      table.insert(recovered, job_id)
    end
  end
  redis.call('ZREM', KEYS[1], job_id)
end
return recovered
"""
"""Put jobs claimed before now - ARGV[1] s and never started back at the front of their queue."""


class Wakeups:
    """Keyspace notifications of changes to the lists of the queues an idle worker serves.

    Subscribed only while the worker is idle: a busy worker reads no messages, and Redis would drop a
    subscriber whose unread messages pile up. Needs `notify-keyspace-events` with `K` and `l` (or `A`),
    as the run command, the compose file and the benchmark configure Redis; else `wait` polls.
    """

    def __init__(self, connection: Redis, keys: list[str]) -> None:
        db = connection.get_connection_kwargs().get("db", 0)
        self.keys = keys
        self.channels = [f"__keyspace@{db}__:{key}" for key in keys]
        self.enabled = keyspace_events_enabled(connection)
        self.listener: PubSub | None = connection.pubsub(ignore_subscribe_messages=True) if self.enabled else None

    def wait(self, seconds: float) -> None:
        """Return when a queue may have a job: a push was notified, or `seconds` passed.

        Returns at once when it has just subscribed, so that the caller looks again: a job pushed
        before the subscription sent no notification to this worker.
        """
        if self.listener is None:
            time.sleep(max(0.0, min(seconds, POLL_SECONDS)))
        elif not self.listener.subscribed:
            self.listener.subscribe(*self.channels)
        elif self.listener.get_message(timeout=max(0.0, min(seconds, WAKEUP_FALLBACK_SECONDS))):
            while self.listener.get_message(timeout=0):  # one look at the queues for a burst of pushes
                pass

    def idle_over(self) -> None:
        if self.listener is not None and self.listener.subscribed:
            self.listener.unsubscribe()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()


def keyspace_events_enabled(connection: Redis) -> bool:
    """Whether Redis notifies list changes on keyspace channels (`notify-keyspace-events` K and l, or A)."""
    try:
        flags = str(connection.config_get("notify-keyspace-events").get("notify-keyspace-events", ""))
    except ResponseError:  # CONFIG renamed or refused, as on some managed services
        flags = ""
    enabled = "K" in flags and ("l" in flags or "A" in flags)
    if not enabled:
        log.warning(
            "Redis notify-keyspace-events is %r: idle workers poll every %g s; set it to Kl", flags, POLL_SECONDS
        )
    return enabled


_wakeups: weakref.WeakKeyDictionary[Redis, Wakeups] = weakref.WeakKeyDictionary()


def wakeups_for(connection: Redis, keys: list[str]) -> Wakeups:
    """The `Wakeups` of a worker's connection, made on its first idle wait."""
    found = _wakeups.get(connection)
    if found is None or sorted(found.keys) != sorted(keys):
        if found is not None:
            found.close()
        found = _wakeups[connection] = Wakeups(connection, keys)
    return found


class ClaimingQueue(Queue):
    """A queue whose jobs are popped and claimed in one step, with a short registry-cleaning lock."""

    @classmethod
    def dequeue_any(
        cls,
        queues: Iterable[Queue],
        timeout: int | None,
        connection: Redis,
        job_class: type[Job] | None = None,
        serializer: Serializer | str | None = None,
        death_penalty_class: type[BaseDeathPenalty] | None = None,
    ) -> tuple[Job, Queue] | None:
        """The next job, claimed; with a `timeout`, wait until one comes or raise `DequeueTimeout`."""
        keys = [queue.key for queue in queues]
        deadline = None if timeout is None else time.monotonic() + timeout
        wakeups = None
        try:
            while True:
                claimed = connection.eval(CLAIM_SCRIPT, len(keys) + 1, CLAIMS_KEY, *keys)
                if claimed:
                    fetched = cls._fetch_claimed(connection, claimed, job_class, serializer, death_penalty_class)
                    if fetched is not None:
                        return fetched
                elif deadline is None:
                    return None
                elif time.monotonic() >= deadline:
                    raise DequeueTimeout(timeout, keys)
                else:
                    wakeups = wakeups or wakeups_for(connection, keys)
                    wakeups.wait(deadline - time.monotonic())
        except RedisError:
            if wakeups is not None:
                wakeups.close()
                _wakeups.pop(connection, None)
            raise
        finally:
            if wakeups is not None and connection in _wakeups:
                wakeups.idle_over()

    @classmethod
    def _fetch_claimed(
        cls,
        connection: Redis,
        claimed: list[bytes],
        job_class: type[Job] | None,
        serializer: Serializer | str | None,
        death_penalty_class: type[BaseDeathPenalty] | None,
    ) -> tuple[Job, Queue] | None:
        """The claimed job and its queue; None (claim dropped) if the job was deleted while queued."""
        queue_key, job_id = (value.decode() for value in claimed)
        try:
            fetched = cls._fetch_dequeued_job(connection, queue_key, job_id, job_class, serializer, death_penalty_class)
        except Exception:
            connection.zrem(CLAIMS_KEY, job_id)  # RQ drops a job it cannot load: so do we
            raise
        if fetched is None:
            connection.zrem(CLAIMS_KEY, job_id)
        return fetched

    def acquire_maintenance_lock(self) -> bool:
        return bool(self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_SECONDS))


class _RetryAtOnce(Job):
    """How the started-job registry's cleanup loads an abandoned job: retried at once, at the front
    of its queue, where it already was when its worker took it."""

    def retry(self, queue: Queue, pipeline: Pipeline) -> None:
        assert self.retries_left
        self.retries_left -= 1
        queue._enqueue_job(self, pipeline=pipeline, at_front=True)
        log.warning("job %s: its worker died; requeued, %d retries left", self.id, self.retries_left)


def _clean_registries(worker: BaseWorker) -> None:
    """RQ's maintenance pass, with abandoned jobs loaded as `_RetryAtOnce`."""
    for queue in worker.queues:
        if queue.acquire_maintenance_lock():
            try:
                cleaning = Queue(queue.name, queue.connection, job_class=_RetryAtOnce, serializer=queue.serializer)
                clean_registries(cleaning, worker._exc_handlers)
                clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(worker, cleaning)
            finally:
                queue.release_maintenance_lock()
    recover_claims(worker.connection)
    worker.last_cleaned_at = now()  # type: ignore[assignment]  # RQ leaves it typed as None


def _retry_abandoned(connection: Redis, queue_name: str) -> None:
    StartedJobRegistry(queue_name, connection=connection, job_class=_RetryAtOnce).cleanup()


def _prepare_execution(worker: BaseWorker, job: Job, in_process: bool = False) -> Execution:
    """RQ's `prepare_execution`, which also sets the job `started` and drops its claim, atomically.

    `in_process`: with what RQ's `prepare_job_execution` writes before the job runs, in the same
    transaction, for a worker that runs the job itself (one round trip less per job).
    """
    ttl = worker.get_heartbeat_ttl(job)
    with worker.connection.pipeline() as pipeline:
        execution = Execution.create(job, ttl, pipeline=pipeline, worker_name=worker.name)
        worker.executions[execution.id] = execution
        worker.set_state(WorkerStatus.BUSY, pipeline=pipeline)
        job.set_status(JobStatus.STARTED, pipeline=pipeline)
        pipeline.zrem(CLAIMS_KEY, job.id)
        if in_process:  # the worker's key lives at least as long as an idle worker's: no beat is due after the job
            worker.heartbeat(max(ttl, worker.worker_ttl + 60), pipeline=pipeline)
            job.heartbeat(now(), ttl, pipeline=pipeline)
            job.prepare_for_execution(worker.name, pipeline=pipeline)
            pipeline.persist(job.key)
        pipeline.execute()
    return execution


class _LeanBookkeeping(BaseWorker):
    """RQ's worker bookkeeping with fewer round trips, and a job heartbeat that expires after
    `heartbeat_grace` s. Per job RQ sends the worker's heartbeat (three commands, one round trip
    each) three times and its state twice: a third of a `SimpleWorker`'s time on no-op jobs here."""

    heartbeat_grace = 15
    HEARTBEAT_EVERY_SECONDS = 1.0
    """A plain heartbeat sooner than this after the last one is skipped, if that one gave the worker's
    key at least as long a TTL: a skipped one must not leave the key a job's short TTL for an idle wait."""
    _suspension_checked = float("-inf")
    _beat_ttl = 0
    """The TTL the last heartbeat of this process gave the worker's key; 0: not known."""
    found_queues_empty = False
    """Whether the worker stopped because it found its queues empty (the end of a burst)."""

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        ttl = timeout or self.worker_ttl + 60
        if pipeline is None and timeout is None and self._beat_is_fresh(ttl):
            return
        if pipeline is not None:
            super().heartbeat(ttl, pipeline)
        else:
            self._beat(ttl)
        self._beat_ttl = ttl

    def _beat_is_fresh(self, ttl: int) -> bool:
        """Whether the last heartbeat came under a second ago with at least `ttl`."""
        if self.last_heartbeat is None or self._beat_ttl < ttl:
            return False
        return (now() - self.last_heartbeat).total_seconds() < self.HEARTBEAT_EVERY_SECONDS

    def _beat(self, ttl: int) -> None:
        """A heartbeat in one round trip; the worker registered again if its key had expired meanwhile
        (a heartbeat then makes a new hash holding only `last_heartbeat`) or left RQ's worker registry."""
        with self.connection.pipeline(transaction=False) as beat:
            super().heartbeat(ttl, beat)
            beat.hexists(self.key, "birth")
            beat.sismember(self.redis_workers_keys, self.key)
            *_, whole, registered = beat.execute()
        if not (whole and registered):
            self._register_again(ttl)

    def _register_again(self, ttl: int) -> None:
        """Write the worker's hash and registry entries again, as a worker's birth does."""
        log.warning("worker %s: its key had expired or left the registry; registered again", self.name)
        with self.connection.pipeline() as pipeline:
            pipeline.hset(self.key, mapping={**self.serialize(), "state": self._state})
            worker_registration.register(self, pipeline)
            pipeline.expire(self.key, ttl)
            pipeline.execute()

    def forget_beat(self) -> None:
        """After a work-horse ran: its heartbeats gave the key a TTL this process did not see."""
        self._beat_ttl = 0

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's; notes whether it found every queue empty, which ends a burst."""
        result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        self.found_queues_empty = result is None and timeout is None
        return result

    def check_for_suspension(self, burst: bool) -> None:
        """RQ looks before every job whether `rq suspend` was called; here at most once a second."""
        if time.monotonic() - self._suspension_checked >= self.HEARTBEAT_EVERY_SECONDS:
            super().check_for_suspension(burst)
            self._suspension_checked = time.monotonic()

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        """Written only when it changes, or with a pipeline: RQ sets `idle` twice between two jobs."""
        if pipeline is not None or state != self._state:
            super().set_state(state, pipeline)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Seconds until the next heartbeat is due (RQ's rule) plus `heartbeat_grace`, not plus 60."""
        interval: float = self.job_monitoring_interval
        if job.timeout and job.timeout > 0:
            interval = min(job.timeout - working_time, interval)
        return max(1, int(interval)) + self.heartbeat_grace


class RecoveringWorker(_LeanBookkeeping, Worker):
    """RQ's forking worker with claimed pops and a job heartbeat that expires after `heartbeat_grace` s."""

    queue_class = ClaimingQueue

    def prepare_execution(self, job: Job) -> Execution:
        return _prepare_execution(self, job)

    def execute_job(self, job: Job, queue: Queue) -> None:
        super().execute_job(job, queue)
        self.forget_beat()

    def clean_registries(self) -> None:
        _clean_registries(self)


class RecoveringSimpleWorker(_LeanBookkeeping, SimpleWorker):
    """RQ's `SimpleWorker` (jobs run in the worker's process, no fork) with claimed pops, heartbeats
    from a thread while a job runs, and an end after `max_jobs_per_process` jobs or `max_memory_mib`
    of memory, so that its pool starts a fresh process in its place (`recycled`)."""

    queue_class = ClaimingQueue
    max_jobs_per_process: int | None = None
    max_memory_mib: float | None = None
    jobs_run = 0
    recycled = False

    def prepare_execution(self, job: Job) -> Execution:
        return _prepare_execution(self, job, in_process=True)

    def clean_registries(self) -> None:
        _clean_registries(self)

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        """RQ's, with the job's heartbeats sent while it runs and stopped before its end is recorded."""
        try:  # RQ's `prepare_job_execution` was done by `prepare_execution`
            job.started_at = now()
            timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
            with (
                _heartbeats(self, job, execution),
                self.death_penalty_class(timeout, JobTimeoutException, job_id=job.id),
            ):
                return_value = job.perform()
            if not self._still_ours(job, execution):
                return False
            self._finalize_success(job, queue, execution, return_value)
        except BaseException:  # as RQ's: whatever the job raised is recorded as its failure
            if self._still_ours(job, execution):
                self._finalize_failure(job, queue, execution, sys.exc_info())
            return False
        return True

    def _still_ours(self, job: Job, execution: Execution) -> bool:
        """Whether the job is still this worker's: one cut off from Redis longer than the heartbeat
        grace finds, once back, its job recovered and run by another worker, whose outcome stands.
        Then only this run's own execution record is removed."""
        if job.connection.hget(job.key, "worker_name") == self.name.encode():
            return True
        log.warning("job %s was taken over by another worker while this one ran it; this run's end is dropped", job.id)
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            pipeline.execute()
        return False

    def execute_job(self, job: Job, queue: Queue) -> None:
        super().execute_job(job, queue)
        self.jobs_run += 1
        reason = self.recycle_reason()
        if reason:
            log.info("worker %s: %s; it stops so that a fresh process takes its place", self.name, reason)
            self.recycled = self._stop_requested = True

    def recycle_reason(self) -> str | None:
        if self.max_jobs_per_process and self.jobs_run >= self.max_jobs_per_process:
            return f"{self.jobs_run} jobs run"
        rss = resident_mib()
        if self.max_memory_mib and rss is not None and rss > self.max_memory_mib:
            return f"{rss:.0f} MiB resident, over {self.max_memory_mib:g}"
        return None


@contextmanager
def _heartbeats(worker: BaseWorker, job: Job, execution: Execution) -> Iterator[None]:
    """Heartbeats every `job_monitoring_interval` s from a thread, for a job run in the worker's own
    process (a forking worker sends them while it waits for its work-horse; RQ's `SimpleWorker` none,
    so a job longer than its heartbeat TTL would be taken for abandoned and run twice)."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(worker.job_monitoring_interval):
            try:
                worker.maintain_heartbeats(job, execution)
            except RedisError as exc:
                log.warning("job %s: heartbeat not sent (%s)", job.id, type(exc).__name__)

    thread = threading.Thread(target=beat, name=f"heartbeat {job.id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)


def resident_mib() -> float | None:
    """This process's resident memory (Linux), or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def recover_claims(connection: Redis) -> list[str]:
    """Put back on their queues the jobs a killed worker popped and never started; their ids.

    A claim older than JOB_HEARTBEAT_GRACE_SECONDS is a dead worker's: a live one registers its job
    within milliseconds of the pop.
    """
    grace = get_settings().job_heartbeat_grace_seconds
    args = (grace, Job.redis_job_namespace_prefix, Queue.redis_queue_namespace_prefix)
    recovered = [job_id.decode() for job_id in connection.eval(RECOVER_SCRIPT, 1, CLAIMS_KEY, *args)]
    if recovered:
        log.warning("requeued %d job(s) popped by a dead worker and never started: %s", len(recovered), recovered)
    return recovered


def clean_started(connection: Redis, queue_names: Iterable[str] = QUEUE_NAMES) -> None:
    """Clean each queue's started-job registry (retry or fail abandoned jobs), under RQ's queue lock."""
    for name in queue_names:
        queue = ClaimingQueue(name, connection=connection)
        if queue.acquire_maintenance_lock():
            try:
                _retry_abandoned(connection, name)
            finally:
                queue.release_maintenance_lock()


def sweep(connection: Redis) -> list[str]:
    """One recovery pass over every queue, for when no worker is alive to run RQ's maintenance."""
    recovered = recover_claims(connection)
    clean_started(connection)
    return recovered


def sent_marker(job: Job | None) -> str | None:
    """What an earlier run of `job` recorded after sending (a Message-ID), or None: not sent yet."""
    if job is None:
        return None
    value = job.connection.get(_sent_key(job))
    return value.decode() if isinstance(value, bytes) else value


def mark_sent(job: Job | None, value: str) -> str:
    """Record that `job` has sent, so that a re-run after its worker died does not send again.

    One duplicate stays possible: a worker killed after the server accepted and before this write.
    """
    if job is not None:
        job.connection.set(_sent_key(job), value, ex=get_settings().result_ttl_seconds or 86_400)
    return value


def _sent_key(job: Job) -> str:
    return f"sent:{job.id}"
