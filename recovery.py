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
  Without a blocking pop over several lists, an idle worker polls every `POLL_SECONDS`.

A job found abandoned gets RQ's treatment (its failure callback sees `AbandonedJobError`; it is
retried while it has retries left, else moved to the failed registry) with one change: it goes back
to the front of its queue at once, without the backoff delay, which is for failing services, not dead
workers. A delayed retry would also wait for RQ's scheduler lock, which a killed worker holds for 61 s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from redis import Redis
from redis.client import Pipeline
from rq import Queue, SimpleWorker, Worker
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry, clean_registries
from rq.serializers import Serializer
from rq.timeouts import BaseDeathPenalty
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
        """The next job, claimed; with a `timeout`, poll until one comes or raise `DequeueTimeout`."""
        keys = [queue.key for queue in queues]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            claimed = connection.eval(CLAIM_SCRIPT, len(keys) + 1, CLAIMS_KEY, *keys)
            if claimed:
                queue_key, job_id = (value.decode() for value in claimed)
                try:
                    fetched = cls._fetch_dequeued_job(
                        connection, queue_key, job_id, job_class, serializer, death_penalty_class
                    )
                except Exception:
                    connection.zrem(CLAIMS_KEY, job_id)  # RQ drops a job it cannot load: so do we
                    raise
                if fetched is not None:
                    return fetched
                connection.zrem(CLAIMS_KEY, job_id)  # deleted while queued
            elif deadline is None:
                return None
            elif time.monotonic() >= deadline:
                raise DequeueTimeout(timeout, keys)
            else:
                time.sleep(POLL_SECONDS)

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


def _prepare_execution(worker: BaseWorker, job: Job) -> Execution:
    """RQ's `prepare_execution`, which also sets the job `started` and drops its claim, atomically."""
    with worker.connection.pipeline() as pipeline:
        execution = Execution.create(job, worker.get_heartbeat_ttl(job), pipeline=pipeline, worker_name=worker.name)
        worker.executions[execution.id] = execution
        worker.set_state(WorkerStatus.BUSY, pipeline=pipeline)
        job.set_status(JobStatus.STARTED, pipeline=pipeline)
        pipeline.zrem(CLAIMS_KEY, job.id)
        pipeline.execute()
    return execution


class RecoveringWorker(Worker):
    """RQ's forking worker with claimed pops and a job heartbeat that expires after `heartbeat_grace` s."""

    queue_class = ClaimingQueue
    heartbeat_grace = 15

    def prepare_execution(self, job: Job) -> Execution:
        return _prepare_execution(self, job)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Seconds until the next heartbeat is due (RQ's rule) plus `heartbeat_grace`, not plus 60."""
        interval: float = self.job_monitoring_interval
        if job.timeout and job.timeout > 0:
            interval = min(job.timeout - working_time, interval)
        return max(1, int(interval)) + self.heartbeat_grace

    def clean_registries(self) -> None:
        _clean_registries(self)


class RecoveringSimpleWorker(SimpleWorker):
    """RQ's `SimpleWorker` (Windows) with claimed pops. It sends no heartbeat while a job runs, so it
    keeps RQ's heartbeat TTL (job timeout + 60 s), and its killed jobs are found that late."""

    queue_class = ClaimingQueue

    def prepare_execution(self, job: Job) -> Execution:
        return _prepare_execution(self, job)

    def clean_registries(self) -> None:
        _clean_registries(self)


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
