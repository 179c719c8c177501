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
  `JOB_HEARTBEAT_GRACE_SECONDS` ago and still `queued`. A worker that runs jobs in its own process
  (`RecoveringSimpleWorker`) needs no claim: its pop starts the job in the same script (`starts`).
  Redis has no blocking pop-and-record over several lists, so an idle worker waits for a keyspace
  notification of a push onto one of its queues (`Wakeups`), or polls every `POLL_SECONDS` where
  the server's `notify-keyspace-events` lacks them.

A job found abandoned gets RQ's treatment (its failure callback sees `AbandonedJobError`; it is
retried while it has retries left, else moved to the failed registry) with one change: it goes back
to the front of its queue at once, without the backoff delay, which is for failing services, not dead
workers. A delayed retry would also wait for RQ's scheduler lock, which a killed worker holds for 61 s.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from redis import Redis
from redis.client import Pipeline, PubSub
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.typing import EncodableT
from rq import Queue, SimpleWorker, Worker, worker_registration
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.rate_limit import RELEASE_AND_ENQUEUE_SCRIPT, RateLimitRegistry
from rq.registry import StartedJobRegistry, clean_registries
from rq.results import Result
from rq.serializers import Serializer
from rq.suspension import is_suspended
from rq.timeouts import BaseDeathPenalty, JobTimeoutException
from rq.utils import backend_class, now, utcformat
from rq.worker import BaseWorker, WorkerStatus
from rq.worker_registration import clean_worker_registry

from herald.infra import keys, metrics
from herald.rq_seam import dates, limits, starts
from settings import QUEUE_NAMES

dates.install()  # RQ's job timestamps read without `strptime`

log = logging.getLogger("recovery")

CLAIMS_KEY = keys.RECOVERY_CLAIMS
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
for i = 2, #KEYS do
  local job_id = redis.call('LPOP', KEYS[i])
  if job_id then
    local job = redis.call('HGETALL', ARGV[1] .. job_id)
    if #job > 0 then
      redis.call('ZADD', KEYS[1], redis.call('TIME')[1], job_id)
    end
    return {KEYS[i], job_id, job}
  end
end
return false
"""
"""Pop the first job of the first non-empty queue (KEYS[2..], in priority order), claim it, and return
its hash (RQ reads it in a second round trip); a job whose hash is gone (deleted while queued) is not claimed."""
JOB_KEY_PREFIX = Job.redis_job_namespace_prefix
CLAIM_SHA = hashlib.sha1(CLAIM_SCRIPT.encode()).hexdigest()


def _finish_script(first_key: int, first_arg: int, then: str, idle_keys: bool = True) -> str:
    """The end of a successful job, its keys from KEYS[first_key] and its words from ARGV[first_arg]:
    -1 if the job's `worker_name` is another than the owner given (unless none is given), 0 if it has
    dependents (nothing written), -2 if the commands write only the job's changed fields (`whole` 0)
    and its hash is gone (deleted while it ran: the caller writes it whole again, as RQ's
    `handle_job_success` does; with an owner, the `worker_name` read for the check tells, as the job's
    start wrote it), else its commands are run (each as its word count, then its words;
    the first `soft` of them, metrics, with their errors ignored), the worker set `idle` if it is given
    (its key and execution index, after the job's; `idle_keys`) and runs no other job, and `then` follows."""
    k, a = first_key, first_arg
    idle = (
        f"""if #KEYS >= {k + 3} and redis.call('SCARD', KEYS[{k + 3}]) == 0 then
  redis.call('HSET', KEYS[{k + 2}], 'state', 'idle')
end
"""
        if idle_keys
        else ""
    )
    return f"""
local owner = ARGV[{a}]
local holder = owner ~= '' and redis.call('HGET', KEYS[{k + 1}], 'worker_name')
if holder and holder ~= owner then
  return -1
end
if redis.call('SCARD', KEYS[{k}]) > 0 then
  return 0
end
if ARGV[{a + 1}] == '0' and not holder and (owner ~= '' or redis.call('EXISTS', KEYS[{k + 1}]) == 0) then
  return -2
end
local soft = tonumber(ARGV[{a + 2}])
local i, n = {a + 3}, 0
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  if n < soft then
    redis.pcall(unpack(ARGV, i + 1, i + count))
  else
    redis.call(unpack(ARGV, i + 1, i + count))
  end
  i, n = i + count + 1, n + 1
end
{idle}{then}"""


FINISH_SCRIPT = _finish_script(1, 1, "return 1")
"""KEYS: the job's dependents set, the job's hash, optionally the worker's key and execution index; ARGV:
the owner, whole (1) or changed fields (0), the soft count, the commands."""
FINISH_SHA = hashlib.sha1(FINISH_SCRIPT.encode()).hexdigest()
FINISH_AND_RELEASE_SCRIPT = _finish_script(3, 7, RELEASE_AND_ENQUEUE_SCRIPT)
"""The same for a job holding a destination slot, then RQ's own release of that slot (which promotes
the next waiting job) in the same script: KEYS and ARGV begin with RQ's release script's own (two
keys, six words), after the job's end is written, as RQ's `release_slot` requires."""
FINISH_AND_RELEASE_SHA = hashlib.sha1(FINISH_AND_RELEASE_SCRIPT.encode()).hexdigest()
POPPED_OR_1 = "local popped = start_next()\nif popped then\n  return popped\nend\nreturn 1"
FINISH_AND_START_SCRIPTS = {
    idle: starts.start_after(5 if idle else 3) + _finish_script(1, starts.START_WORDS + 1, POPPED_OR_1, idle)
    for idle in (False, True)
}
"""The same, then the next waiting job popped and started as `starts.START_SCRIPT` does: KEYS the job's
dependents set and hash, the worker's key and execution index if `idle` (by key: True), then the queues;
ARGV the start's words (`starts.Start.words`), then the finish's. Answers as `FINISH_SCRIPT`, or, where a
job was waiting, the start's answer: the next job in the same round trip as the end of the one before (a
worker set `idle` by the end is set `busy` again by the start, in the same script)."""
FINISH_AND_START_SHAS = {
    idle: hashlib.sha1(script.encode()).hexdigest() for idle, script in FINISH_AND_START_SCRIPTS.items()
}


class TakenOver(Exception):
    """The job's end is not this run's to write: another worker took the job over (`finish_owner`)."""


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


def run_script(connection: Redis | Pipeline, script: str, sha: str, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA, or EVAL where Redis does not hold the script yet (a restart, SCRIPT FLUSH)."""
    try:
        return connection.evalsha(sha, len(keys), *keys, *args)
    except NoScriptError:
        return connection.eval(script, len(keys), *keys, *args)


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
        by_key = {queue.key: queue for queue in queues}
        keys = list(by_key)
        deadline = None if timeout is None else time.monotonic() + timeout
        wakeups = None
        starter = _starter.get()
        try:
            while True:
                start = None if starter is None else starts.Start(starter)
                if start is None:
                    claimed = run_script(connection, CLAIM_SCRIPT, CLAIM_SHA, [CLAIMS_KEY, *keys], [JOB_KEY_PREFIX])
                else:
                    claimed = run_script(connection, starts.START_SCRIPT, starts.START_SHA, keys, start.words())
                if claimed:
                    fetched = cls._fetch_claimed(
                        connection, claimed, by_key, job_class, serializer, death_penalty_class, start
                    )
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
        claimed: list[Any],
        by_key: dict[str, Queue],
        job_class: type[Job] | None,
        serializer: Serializer | str | None,
        death_penalty_class: type[BaseDeathPenalty] | None,
        start: starts.Start | None = None,
    ) -> tuple[Job, Queue] | None:
        """The claimed job, made from the hash the claim returned, and its queue; None if the job was
        deleted while queued. RQ's `_fetch_dequeued_job`, without its HGETALL, and with the queue
        the caller gave (`by_key`) rather than one made anew for each job. With a `start`, the job
        was started by the script too, and is set so here."""
        queue_key, job_id, fields = claimed[0].decode(), claimed[1].decode(), claimed[2]
        job_cls: type[Job] = backend_class(cls, "job_class", override=job_class)
        queue = by_key.get(queue_key) or cls.from_queue_key(
            queue_key,
            connection=connection,
            job_class=job_cls,
            serializer=serializer,
            death_penalty_class=death_penalty_class,
        )
        if not fields:
            return None
        job = job_cls(job_id, connection=connection, serializer=serializer)
        try:
            job.restore(dict(zip(fields[::2], fields[1::2], strict=True)))
        except Exception as exc:  # as RQ's: the job is dropped, its id and queue on the error for the handlers
            if start is None:
                connection.zrem(CLAIMS_KEY, job_id)
            else:
                start.undo(connection, claimed)
            exc.job_id = job_id  # type: ignore[attr-defined]
            exc.queue = queue  # type: ignore[attr-defined]
            raise
        if start is not None:
            start.apply(job, claimed)
        return job, queue

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


def _clean_registries(worker: _LeanBookkeeping) -> None:
    """RQ's maintenance pass, with abandoned jobs loaded as `_RetryAtOnce`; claims older than the
    worker's `heartbeat_grace` are recovered."""
    for queue in worker.queues:
        if queue.acquire_maintenance_lock():
            try:
                cleaning = Queue(queue.name, queue.connection, job_class=_RetryAtOnce, serializer=queue.serializer)
                clean_registries(cleaning, worker._exc_handlers)
                clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(worker, cleaning)
            finally:
                queue.release_maintenance_lock()
    recover_claims(worker.connection, worker.heartbeat_grace)
    worker.last_cleaned_at = now()  # type: ignore[assignment]  # RQ leaves it typed as None


def _retry_abandoned(connection: Redis, queue_name: str) -> None:
    StartedJobRegistry(queue_name, connection=connection, job_class=_RetryAtOnce).cleanup()


_starter: ContextVar[starts.Starter | None] = ContextVar("starter", default=None)
"""The worker whose pop this is, if it starts the job in the same script (`RecoveringSimpleWorker`)."""


@contextmanager
def pops_start(worker: starts.Starter) -> Iterator[None]:
    """Within the block, this thread's pops (`ClaimingQueue.dequeue_any`) also start the job for `worker`."""
    token = _starter.set(worker)
    try:
        yield
    finally:
        _starter.reset(token)


_soft_writes: ContextVar[Pipeline | None] = ContextVar("soft_writes", default=None)
"""The metrics a job's success callback recorded, while its end is written (`_finalize_success`)."""


@contextmanager
def soft_writes(connection: Redis) -> Iterator[None]:
    """Metrics recorded in this thread within the block (by a job, its callbacks) go with the job's end
    (`handle_job_success`), or are sent on leaving the block; within an outer block, the outer one's."""
    if _soft_writes.get() is not None:
        yield
        return
    with connection.pipeline(transaction=False) as soft:
        token = _soft_writes.set(soft)
        try:
            with metrics.deferred(soft):
                yield
        finally:
            _soft_writes.reset(token)
            _send_soft(soft)


def _send_soft(pipeline: Pipeline) -> None:
    """Send what is left on `pipeline`; as for any metrics, an error is logged, never raised."""
    if pipeline.command_stack:
        try:
            pipeline.execute()
        except RedisError as exc:
            log.warning("metrics not recorded: %s", type(exc).__name__)


def _prepare_execution(worker: _LeanBookkeeping, job: Job, in_process: bool = False) -> Execution:
    """RQ's `prepare_execution`, which also sets the job `started` and drops its claim, atomically.

    `in_process`: with what RQ's `prepare_job_execution` writes before the job runs, in the same
    transaction, for a worker that runs the job itself (one round trip less per job).
    """
    ttl = worker.get_heartbeat_ttl(job)
    with worker.connection.pipeline() as pipeline:
        execution = Execution.create(job, ttl, pipeline=pipeline, worker_name=worker.name)
        worker.executions[execution.id] = execution
        pipeline.zrem(CLAIMS_KEY, job.id)
        if in_process:
            worker.write_start(job, ttl, pipeline)
        else:
            worker.set_state(WorkerStatus.BUSY, pipeline=pipeline)
            job.set_status(JobStatus.STARTED, pipeline=pipeline)
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
        if not (whole and registered) and self.birth_date is not None:  # a worker that never ran work() has none
            self._register_again(ttl)

    def _register_again(self, ttl: int) -> None:
        """Write the worker's hash and registry entries again, as a worker's birth does."""
        log.warning("worker %s: its key had expired or left the registry; registered again", self.name)
        with self.connection.pipeline() as pipeline:
            pipeline.hset(self.key, mapping={**self.serialize(), "state": self._state})
            worker_registration.register(self, pipeline)
            pipeline.expire(self.key, ttl)
            pipeline.execute()

    def write_start(self, job: Job, ttl: int, pipeline: Pipeline) -> None:
        """What RQ writes when a worker starts a job in its own process, with each field once: RQ sets
        the worker's state and heartbeat, and the job's status and heartbeat, in two writes each. The
        worker's heartbeat is left out when the last one was under a second ago with a long enough TTL."""
        worker_ttl = max(ttl, self.worker_ttl + 60)  # the worker's key lives at least as long as an idle worker's
        fields: dict[Any, Any] = {"state": WorkerStatus.BUSY.value}
        if not self._beat_is_fresh(worker_ttl):
            self.last_heartbeat = now()
            fields["last_heartbeat"] = utcformat(self.last_heartbeat)
            pipeline.expire(self.key, worker_ttl)
            pipeline.expire(self.executions_key, worker_ttl)
            self._beat_ttl = worker_ttl
        pipeline.hset(self.key, mapping=fields)
        self._state = WorkerStatus.BUSY
        job.prepare_for_execution(self.name, pipeline=pipeline)  # status, started_at, last_heartbeat, worker
        pipeline.persist(job.key)

    def forget_beat(self) -> None:
        """After a work-horse ran: its heartbeats gave the key a TTL this process did not see."""
        self._beat_ttl = 0

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's, which sets the worker `idle` before it looks for a job; here a busy worker first takes
        a waiting job, and stays busy (two writes less per job). Notes whether it found every queue
        empty, which ends a burst."""
        result = self._waiting_job() if self._state == WorkerStatus.BUSY else None
        if result is None:
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        self.found_queues_empty = result is None and timeout is None
        return result

    def _waiting_job(self) -> tuple[Job, Queue] | None:
        """The next job if one is waiting, without waiting; what RQ does on dequeueing one."""
        result = self.queue_class.dequeue_any(
            self._ordered_queues,
            None,
            connection=self.connection,
            job_class=self.job_class,
            serializer=self.serializer,
            death_penalty_class=self.death_penalty_class,
        )
        return None if result is None else self._dequeued(*result)

    def _dequeued(self, job: Job, queue: Queue) -> tuple[Job, Queue]:
        """What RQ's dequeue does with a job it popped."""
        self.reorder_queues(reference_queue=queue)
        job.redis_server_version = self.get_redis_server_version()
        self.log.info("Worker %s: %s: %s (%s)", self.name, queue.name, job.description, job.id)
        return job, queue

    def _finalize_success(self, job: Job, queue: Queue, execution: Execution, return_value: Any) -> None:
        """RQ's, with what the success callback records for metrics sent with the job's end (one
        round trip less per job), or after it where RQ's own path writes the end."""
        with soft_writes(self.connection):
            super()._finalize_success(job, queue, execution, return_value)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        """RQ writes the job's `last_heartbeat` here; after a job that returned, the save of its end
        writes it a moment later, so here it is only set (one round trip less per job)."""
        if job.get_status(refresh=False) != JobStatus.STARTED:  # raised: RQ's failure path, which saves no heartbeat
            super().handle_execution_ended(job, queue, heartbeat_ttl)
            return
        job.ended_at = job.last_heartbeat = now()

    def handle_job_success(
        self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry, execution: Execution
    ) -> None:
        """RQ's writes of a successful job's end, as one script that applies them if the job has no
        dependents (RQ's check: a WATCH, an SMEMBERS and a transaction, three round trips), else RQ's
        own path. Left out: the job's status written twice, and the TTLs of its dependents and
        dependencies keys, which do not exist. A repeating job, or one whose result is not kept, takes
        RQ's path."""
        result_ttl = job.get_result_ttl(self.default_result_ttl)
        if result_ttl == 0 or job.repeats_left:
            owner = self.finish_owner()
            holder = job.connection.hget(job.key, "worker_name") if owner else None
            if holder is not None and holder != owner.encode():
                raise TakenOver()
            super().handle_job_success(job, queue, started_job_registry, execution)
            return
        soft = _soft_writes.get()
        soft_commands = list(soft.command_stack) if soft is not None else []
        outcome = self._run_finish(job, self._end_words(job, result_ttl, execution, soft_commands, whole=False))
        if outcome == -2:  # its hash was deleted while it ran: written whole again, as RQ's own does
            outcome = self._run_finish(job, self._end_words(job, result_ttl, execution, soft_commands, whole=True))
        if outcome == -1:
            raise TakenOver()
        if outcome == 0:  # it has dependents
            super().handle_job_success(job, queue, started_job_registry, execution)
            return
        if soft is not None:
            soft.command_stack.clear()
        self.ended_in_script()
        job._status = JobStatus.FINISHED
        taken = job.ended_at - job.started_at  # type: ignore[operator]
        if self.log_job_description:  # RQ's own line, as `handle_job_success` writes it
            self.log.info("Successfully completed %s job in %ss on worker %s", job.description, taken, self.name)
        else:
            self.log.info("Successfully completed job %s in %ss on worker %s", job.id, taken, self.name)

    def _end_words(
        self, job: Job, result_ttl: int, execution: Execution, soft_commands: list[Any], whole: bool
    ) -> list[Any]:
        """The finish script's words after the owner: `whole`, then the soft count and each command."""
        with self.connection.pipeline() as recorder:  # never executed: the script replays its commands
            self._record_success(job, result_ttl, execution, recorder, whole)
            commands = soft_commands + recorder.command_stack
        return [int(whole), len(soft_commands), *(word for args, _ in commands for word in (len(args), *args))]

    def _run_finish(self, job: Job, words: list[Any]) -> Any:
        """The finish script (`_finish_script`), with the release of the job's slot if it holds one."""
        owner, keys = self.finish_owner(), [job.dependents_key, job.key, *self.idle_keys()]
        start = None if job.rate_limit_key else self.next_start()
        if start is not None:
            queues = [queue.key for queue in self._ordered_queues]
            idle = len(keys) > 2
            script, sha = FINISH_AND_START_SCRIPTS[idle], FINISH_AND_START_SHAS[idle]
            answer = None
            try:
                answer = run_script(self.connection, script, sha, [*keys, *queues], [*start.words(), owner, *words])
            finally:  # raised: None, nothing popped
                outcome = self.popped_with_end(start, answer)
            return outcome
        if not job.rate_limit_key:
            return run_script(self.connection, FINISH_SCRIPT, FINISH_SHA, keys, [owner, *words])
        job._status = JobStatus.FINISHED  # as written by the script, before its release part runs
        release_keys, release_words = limits.release_arguments(job)
        script, sha = FINISH_AND_RELEASE_SCRIPT, FINISH_AND_RELEASE_SHA
        return run_script(self.connection, script, sha, [*release_keys, *keys], [*release_words, owner, *words])

    def next_start(self) -> starts.Start | None:
        """A start of the next waiting job, for a successful job's end script to write as well; None:
        the worker pops its next job itself."""
        return None

    def popped_with_end(self, start: starts.Start, outcome: Any) -> Any:
        """The end script's outcome, given the start it also wrote (`next_start`); None if it raised."""
        return outcome

    def idle_keys(self) -> list[str]:
        """The worker's key and execution index, for the finish script to set the worker `idle` when
        the job leaves none of its executions running; none: the script leaves the state alone."""
        return []

    def ended_in_script(self) -> None:
        """Called once the finish script wrote a job's end (and, with `idle_keys`, the worker's state)."""

    def finish_owner(self) -> str:
        """The worker name the job must still have for its end to be written (`TakenOver` if not);
        empty: not checked (the forking worker's work-horse, as RQ's)."""
        return ""

    def _record_success(
        self, job: Job, result_ttl: int, execution: Execution, pipeline: Pipeline, whole: bool = True
    ) -> None:
        """RQ's `handle_job_success` writes, without those `handle_job_success` tells. Not `whole`: of the
        job's hash only the fields its run changed (RQ saves every field again, its data compressed anew)."""
        self.increment_successful_job_count(pipeline=pipeline)
        self.increment_total_working_time(job.ended_at - job.started_at, pipeline)  # type: ignore[operator]
        job._status = JobStatus.FINISHED
        if whole:
            job.save(pipeline=pipeline, include_meta=False, include_result=False)
        else:
            pipeline.hset(job.key, mapping=ran_fields(job))
        Result.create(
            job,
            Result.Type.SUCCESSFUL,
            return_value=job._result,
            ttl=result_ttl,
            worker_name=self.name,
            pipeline=pipeline,
            execution_id=execution.id,
            execution_started_at=execution.created_at,
            execution_ended_at=job.ended_at,
        )
        job.finished_job_registry.add(job, result_ttl, pipeline)
        if result_ttl > 0:
            pipeline.expire(job.key, result_ttl)
            if job._dependency_ids:
                pipeline.expire(job.dependencies_key, result_ttl)
        self.cleanup_execution(job, pipeline=pipeline, execution=execution)

    def check_for_suspension(self, burst: bool) -> None:
        """RQ looks before every job whether `rq suspend` was called; here at most once a second."""
        if time.monotonic() - self._suspension_checked >= self.HEARTBEAT_EVERY_SECONDS:
            self.before_suspension_check()
            super().check_for_suspension(burst)
            self._suspension_checked = time.monotonic()

    def before_suspension_check(self) -> None:
        """Called before each look whether the worker is suspended (which may wait until it is resumed)."""

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


def ran_fields(job: Job) -> dict[EncodableT, EncodableT]:
    """The fields of a job's hash that its run changed, as `Job.to_dict` writes them: what RQ's
    `prepare_for_execution` wrote at its start, its status, and its end."""
    return {
        "status": str(job.get_status(refresh=False).value),
        "worker_name": job.worker_name or "",
        **{name: utcformat(moment) if (moment := getattr(job, name)) else "" for name in RAN_DATES},
    }


RAN_DATES = ("started_at", "ended_at", "last_heartbeat")


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job_heartbeats = JobHeartbeats(self)
        self._started: dict[str, Execution] = {}
        """Job id -> the execution its pop started (`starts`), until the job's run takes it."""
        self._popped: tuple[list[Any], starts.Start] | None = None
        """The next job, popped and started by the end script of the one before, until the loop takes it."""
        self._found_empty = False
        """Whether the end script of the job before found no job waiting."""

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """Each job popped is started in the same script (`starts.START_SCRIPT`): one round trip less."""
        with pops_start(self):
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def next_start(self) -> starts.Start | None:
        """One job at a time: a successful job's end pops and starts the next (one round trip per job),
        unless the worker stops after this job (asked to, or its share of jobs or memory is reached)."""
        if self._stop_requested or self._popped is not None or self._last_job():
            return None
        return starts.Start(self)

    def _last_job(self) -> bool:
        """Whether the job running is the last this process runs (`recycle_reason` once it has ended)."""
        if self.max_jobs_per_process and self.jobs_run + 1 >= self.max_jobs_per_process:
            return True
        return self.recycle_reason() is not None

    def popped_with_end(self, start: starts.Start, outcome: Any) -> Any:
        """A job popped by the end script waits for the loop's next dequeue (`_waiting_job`)."""
        if isinstance(outcome, list):
            self._popped = (outcome, start)
            return 1
        self._found_empty = outcome == 1
        return outcome

    def _waiting_job(self) -> tuple[Job, Queue] | None:
        """The job the end of the one before popped, if it did; none if it found the queues empty (RQ's
        dequeue, which waits, comes next); else a pop."""
        popped, self._popped = self._popped, None
        found_empty, self._found_empty = self._found_empty, False
        result = None if popped is None else self.job_popped_with_end(popped)
        if result is not None:
            return result
        return None if found_empty else super()._waiting_job()

    def job_popped_with_end(self, popped: tuple[list[Any], starts.Start]) -> tuple[Job, Queue] | None:
        """The job an end script popped and started (its answer, and the start), made from the hash the
        script read, as RQ's dequeue does; None if it was deleted while queued (nothing was started)."""
        by_key = {queue.key: queue for queue in self._ordered_queues}
        serializer, penalty = self.serializer, self.death_penalty_class
        result = ClaimingQueue._fetch_claimed(
            self.connection, popped[0], by_key, self.job_class, serializer, penalty, popped[1]
        )
        return None if result is None else self._dequeued(*result)

    def before_suspension_check(self) -> None:
        """A suspended worker gives back the job the end of the one before popped, before it waits to be
        resumed: its start's heartbeat would expire meanwhile, and the job run again elsewhere."""
        if self._popped is not None and is_suspended(self.connection, self):
            self.give_back_popped()

    def give_back_popped(self) -> None:
        """A job the end script popped and started, which the worker leaves without running (it stopped):
        back at the front of its queue, as if never popped."""
        popped, self._popped = self._popped, None
        if popped is not None:
            self.give_back(popped)

    def give_back(self, popped: tuple[list[Any], starts.Start]) -> None:
        """A job an end script popped and started, back at the front of its queue (`Start.give_back`)."""
        if popped[0][2]:  # no fields: deleted while queued, nothing started
            popped[1].give_back(self.connection, popped[0])

    def beat_due(self, ttl: int) -> bool:
        """Whether a job's start sends the worker's heartbeat too (`write_start`'s rule)."""
        return not self._beat_is_fresh(ttl)

    def started(self, job: Job, execution: Execution, beat_ttl: int | None) -> None:
        """A pop started `job` (`starts.Start.apply`): the worker is busy, and beat if `beat_ttl`."""
        self._state = WorkerStatus.BUSY
        if beat_ttl is not None:
            self.last_heartbeat = execution.created_at
            self._beat_ttl = beat_ttl
        self._started[job.id] = execution

    def prepare_execution(self, job: Job) -> Execution:
        """The execution the job's pop started, or (a job given otherwise) its start written now."""
        execution = self._started.pop(job.id, None)
        return execution or _prepare_execution(self, job, in_process=True)

    def teardown(self) -> None:
        self.give_back_popped()
        self.job_heartbeats.stop()
        super().teardown()

    def clean_registries(self) -> None:
        _clean_registries(self)

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        """RQ's, with the job's heartbeats sent while it runs and stopped before its end is recorded."""
        with soft_writes(self.connection):  # the job's metrics ride with its end
            return self._perform_job(job, queue, execution)

    def _perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        try:  # RQ's `prepare_job_execution` was done by `prepare_execution`
            job.started_at = now()
            timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
            with (
                self.job_heartbeats.running(job, execution),
                self.death_penalty_class(timeout, JobTimeoutException, job_id=job.id),
            ):
                return_value = job.perform()
            self._finalize_success(job, queue, execution, return_value)
        except TakenOver:  # raised by `handle_job_success` before it wrote anything
            self._drop_run(job, execution)
            return False
        except BaseException:  # as RQ's: whatever the job raised is recorded as its failure
            if self._still_ours(job, execution):
                self._finalize_failure(job, queue, execution, sys.exc_info())
            return False
        return True

    def finish_owner(self) -> str:
        return str(self.name)

    def _still_ours(self, job: Job, execution: Execution) -> bool:
        """Whether the job is still this worker's: one cut off from Redis longer than the heartbeat
        grace finds, once back, its job recovered and run by another worker, whose outcome stands.
        Then only this run's own execution record is removed. (After a job that returned, the finish
        script checks it, `finish_owner`.)"""
        if job.connection.hget(job.key, "worker_name") == self.name.encode():
            return True
        self._drop_run(job, execution)
        return False

    def _drop_run(self, job: Job, execution: Execution) -> None:
        log.warning("job %s was taken over by another worker while this one ran it; this run's end is dropped", job.id)
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            pipeline.execute()

    def execute_job(self, job: Job, queue: Queue) -> None:
        """RQ's `SimpleWorker.execute_job` without its `idle` write after the job: the next dequeue writes
        it if no job is waiting (`dequeue_job_and_maintain_ttl`), else the worker stays busy."""
        self.perform_job(job, queue, self.prepare_execution(job))
        self.jobs_run += 1
        reason = self.recycle_reason()
        if reason:
            log.info("worker %s: %s; it stops so that a fresh process takes its place", self.name, reason)
            self.recycled = self._stop_requested = True

    def recycle_reason(self) -> str | None:
        if self.max_jobs_per_process and self.jobs_run >= self.max_jobs_per_process:
            return f"{self.jobs_run} jobs run"
        rss = peak_resident_mib() if self.max_memory_mib else None
        if self.max_memory_mib and rss is not None and rss > self.max_memory_mib:
            return f"{rss:.0f} MiB resident at its peak, over {self.max_memory_mib:g}"
        return None


class JobHeartbeats:
    """The heartbeats of the jobs a worker runs in its own process, every `job_monitoring_interval` s,
    from one thread per worker (a forking worker sends them while it waits for its work-horse; RQ's
    `SimpleWorker` none, so a job longer than its heartbeat TTL would be taken for abandoned and run
    twice). One long-lived thread, not one per job: starting and joining a thread per job cost a
    no-op job half its wall time on a loaded machine. A job's first beat is due one interval after
    its start, and the thread never sleeps longer than that, so a start needs no wake-up."""

    def __init__(self, worker: BaseWorker) -> None:
        self.worker = worker
        self.lock = threading.Lock()
        """Held while beating: a job's end waits for a beat in flight, which must not follow it."""
        self.due: dict[str, tuple[Job, Execution, float]] = {}
        """Job id -> the job, its execution, and when (monotonic) its next beat is due."""
        self.stopped = threading.Event()
        """The running thread's: a new thread (a worker working again after its teardown) gets a new one."""
        self.thread: threading.Thread | None = None

    @contextmanager
    def running(self, job: Job, execution: Execution) -> Iterator[None]:
        """Beats for `job` while the block runs; none once it has left."""
        with self.lock:
            self.due[job.id] = (job, execution, time.monotonic() + self.worker.job_monitoring_interval)
        if self.thread is None or not self.thread.is_alive():
            self.stopped = threading.Event()
            name = f"heartbeats {self.worker.name}"
            self.thread = threading.Thread(target=self._run, args=(self.stopped,), name=name, daemon=True)
            self.thread.start()
        try:
            yield
        finally:
            with self.lock:
                self.due.pop(job.id, None)

    def stop(self) -> None:
        """End the thread (it is not waited for: it holds no job any more)."""
        self.stopped.set()
        self.thread = None

    def _run(self, stopped: threading.Event) -> None:
        while not stopped.wait(self._beat_due()):
            pass

    def _beat_due(self) -> float:
        """Send the beats that are due; seconds until the next one is."""
        interval = self.worker.job_monitoring_interval
        with self.lock:
            for job_id, (job, execution, due) in list(self.due.items()):
                if due <= time.monotonic():
                    self._beat(job, execution)
                    self.due[job_id] = (job, execution, time.monotonic() + interval)
            next_due = min((due for _, _, due in self.due.values()), default=time.monotonic() + interval)
        return max(0.0, next_due - time.monotonic())

    def _beat(self, job: Job, execution: Execution) -> None:
        try:
            self.worker.maintain_heartbeats(job, execution)
        except RedisError as exc:
            log.warning("job %s: heartbeat not sent (%s)", job.id, type(exc).__name__)


def peak_resident_mib() -> float | None:
    """The most resident memory this process has held (since its fork), or None where unknown (Windows).

    One `getrusage`, which (unlike a read of /proc) does not let go of the GIL: checked after every
    job, a read handed the GIL to another thread of a threaded worker each time.
    """
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def recover_claims(connection: Redis, grace_seconds: int) -> list[str]:
    """Put back on their queues the jobs a killed worker popped and never started; their ids.

    A claim older than `grace_seconds` (JOB_HEARTBEAT_GRACE_SECONDS) is a dead worker's: a live one
    registers its job within milliseconds of the pop.
    """
    args = (grace_seconds, Job.redis_job_namespace_prefix, Queue.redis_queue_namespace_prefix)
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


def sweep(connection: Redis, grace_seconds: int) -> list[str]:
    """One recovery pass over every queue, for when no worker is alive to run RQ's maintenance."""
    recovered = recover_claims(connection, grace_seconds)
    clean_started(connection)
    release_stale_slots(connection)
    return recovered


def release_stale_slots(connection: Redis) -> None:
    """The per-destination part of RQ's maintenance (`clean_registries` ends with it): each key's
    slots held by jobs that no longer need one (ended, failed, scheduled or deleted, by a worker that
    died before giving the slot back) are freed, waiting jobs are promoted into free slots, and keys
    with no job left are dropped.

    After `clean_started`: an abandoned job it requeues is `queued` and keeps its slot, as RQ's own
    cleanup leaves it; one it fails has had its slot given back by that cleanup already.
    """
    for registry in RateLimitRegistry.all(connection):
        registry.cleanup()
