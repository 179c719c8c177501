"""A job popped and started in one script, for a worker that runs its jobs in its own process.

RQ pops a job in one round trip, reads its hash in a second (the claim script does both) and records its
start in a third: `prepare_execution` (the execution's hash, its job's execution registry, the started
registry, the worker's execution index) and `prepare_job_execution` (the worker busy, the job's status,
start, heartbeat and worker). `START_SCRIPT` pops, reads and writes that start in one script, with the
same keys, values and TTLs as the two-step start (`tests/test_starts.py` compares every key). A job so
started needs no claim: it is in the started registry from the moment it leaves its queue, and a worker
that dies then is recovered as one that died while running it. Written for RQ 3.0's `Execution.create` and
`Job.prepare_for_execution` (`herald.rq_seam` checks the version).

A worker that runs one job at a time goes further: the end script of a successful job pops and starts
the next one too (`start_after`, `recovery.FINISH_AND_START_SCRIPTS`), so each job costs one round trip.
A job so popped waits in the worker for the loop's next dequeue; a worker that stops first gives it back
(`Start.give_back`): the front of its queue, the job's fields as they were, no records of the start.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from redis import Redis
from redis.client import Pipeline
from rq import Queue
from rq.defaults import RQ_KEY_PREFIX
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE, Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.utils import now, utcformat

START_BODY = """
local job_prefix, execution_id, moment, stamp, iso = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local worker, worker_key, worker_executions = ARGV[6], ARGV[7], ARGV[8]
local interval, grace, worker_ttl, beat = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12]
for i = FIRST_QUEUE, #KEYS do
  local job_id = redis.call('LPOP', KEYS[i])
  if job_id then
    local job = redis.call('HGETALL', job_prefix .. job_id)
    if #job == 0 then
      return {KEYS[i], job_id, job}
    end
    local fields = {}
    for j = 1, #job, 2 do
      fields[job[j]] = job[j + 1]
    end
    local timeout = tonumber(fields['timeout'] or '')
    if timeout and timeout > 0 and timeout < interval then
      interval = timeout
    end
    local ttl = math.max(1, math.floor(interval)) + grace
    worker_ttl = math.max(ttl, worker_ttl)
    local composite = job_id .. ':' .. execution_id
    local started = ARGV[15] .. (fields['origin'] or string.sub(KEYS[i], #ARGV[16] + 1))
    local execution = ARGV[13] .. composite
    redis.call('HSET', execution, 'id', execution_id, 'job_id', job_id, 'created_at', moment,
      'last_heartbeat', moment, 'worker_name', worker)
    redis.call('EXPIRE', execution, ttl)
    redis.call('ZADD', ARGV[14] .. job_id, stamp + ttl + 60, execution_id)
    redis.call('EXPIRE', ARGV[14] .. job_id, ttl + 60)
    redis.call('ZADD', started, stamp + ttl, composite)
    redis.call('SADD', worker_executions, composite)
    redis.call('EXPIRE', worker_executions, ttl + 60)
    if beat == '1' then
      redis.call('EXPIRE', worker_key, worker_ttl)
      redis.call('EXPIRE', worker_executions, worker_ttl)
      redis.call('HSET', worker_key, 'state', 'busy', 'last_heartbeat', iso)
    else
      redis.call('HSET', worker_key, 'state', 'busy')
    end
    redis.call('HSET', job_prefix .. job_id, 'last_heartbeat', iso, 'status', 'started', 'started_at', iso,
      'worker_name', worker)
    redis.call('PERSIST', job_prefix .. job_id)
    return {KEYS[i], job_id, job, worker_ttl, started}
  end
end
return false
"""
START_SCRIPT = START_BODY.replace("FIRST_QUEUE", "1")
"""KEYS: the queues, in priority order. ARGV: the job key prefix, the execution's id, the moment (as a
timestamp, as seconds, as RQ's date string), the worker's name, key and execution index, its job
heartbeat interval and grace, its own key's least TTL, whether to beat (1) now, the prefixes of the keys
of executions, of a job's executions, of started registries and of queues. Answers the queue, the job's
id and its hash as read before the start (empty: deleted while queued, nothing written), then the TTL
the worker's key was given (if it beat) and the started registry's key."""
START_SHA = hashlib.sha1(START_SCRIPT.encode()).hexdigest()
START_WORDS = 16
"""How many of ARGV are the start's (`Start.words`)."""


def start_after(first_queue: int) -> str:
    """Lua that starts the next job as `START_SCRIPT` does, its queues from KEYS[first_queue] and its words
    ARGV[1..START_WORDS], returning the script's answer (false: no job waiting): for the end of a job."""
    return f"local function start_next()\n{START_BODY.replace('FIRST_QUEUE', str(first_queue))}end\n"


EXECUTION_KEY_PREFIX = f"{RQ_KEY_PREFIX}:execution:"
"""`Execution.key` without its composite key (job id, execution id)."""
EXECUTIONS_KEY_PREFIX = ExecutionRegistry.key_template.format("")
STARTED_KEY_PREFIX = StartedJobRegistry.key_template.format("")
QUEUE_KEY_PREFIX = Queue.redis_queue_namespace_prefix


class Starter(Protocol):
    """A worker whose pops also start the job (`RecoveringSimpleWorker`)."""

    @property
    def name(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def connection(self) -> Redis: ...
    @property
    def executions(self) -> dict[str, Execution]: ...
    @property
    def job_monitoring_interval(self) -> int: ...
    @property
    def heartbeat_grace(self) -> int: ...
    @property
    def worker_ttl(self) -> int: ...

    def beat_due(self, ttl: int) -> bool: ...

    def started(self, job: Job, execution: Execution, beat_ttl: int | None) -> None: ...


@dataclass
class Start:
    """One try of the start script: its words, and what they promise."""

    worker: Starter
    moment: datetime = field(default_factory=now)
    execution_id: str = field(default_factory=lambda: f"{random.getrandbits(128):032x}")
    """As RQ's (`uuid4().hex`), 32 hexadecimal digits, from `random` (seeded anew in a forked child), not
    from `os.urandom`, a system call for each job."""
    beat: bool = False

    def words(self) -> list[Any]:
        worker = self.worker
        least_ttl = worker.worker_ttl + 60  # as `write_start`: an idle worker's key lives this long
        longest_job_ttl = max(1, int(worker.job_monitoring_interval)) + worker.heartbeat_grace
        self.beat = worker.beat_due(max(least_ttl, longest_job_ttl))
        return [
            Job.redis_job_namespace_prefix,
            self.execution_id,
            repr(self.moment.timestamp()),
            int(self.moment.timestamp()),
            utcformat(self.moment),
            worker.name,
            worker.key,
            WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker.name),
            worker.job_monitoring_interval,
            worker.heartbeat_grace,
            least_ttl,
            int(self.beat),
            EXECUTION_KEY_PREFIX,
            EXECUTIONS_KEY_PREFIX,
            STARTED_KEY_PREFIX,
            QUEUE_KEY_PREFIX,
        ]

    def apply(self, job: Job, answer: list[Any]) -> Execution:
        """What the script wrote, on the job and the worker, as RQ's start sets them in memory."""
        worker = self.worker
        job.worker_name = worker.name
        job.last_heartbeat = job.started_at = self.moment
        job._status = JobStatus.STARTED
        execution = Execution(self.execution_id, job.id, connection=worker.connection, worker_name=worker.name)
        execution.created_at = execution.last_heartbeat = self.moment
        execution._job = job
        worker.executions[execution.id] = execution
        worker.started(job, execution, int(answer[3]) if self.beat else None)
        return execution

    def undo(self, connection: Redis, answer: list[Any]) -> None:
        """Remove the start's records of a job that could not be read (RQ drops such a job)."""
        with connection.pipeline() as pipeline:
            self._remove_records(pipeline, answer)
            pipeline.execute()

    def give_back(self, connection: Redis, answer: list[Any]) -> None:
        """Undo the start of a job the worker will not run (it stopped after the end script that started
        it): its records removed, the fields the start wrote as they were, and the job back at the front
        of its queue, where its pop took it from; in one transaction."""
        job_id, before = answer[1].decode(), dict(zip(answer[2][::2], answer[2][1::2], strict=True))
        job_key = f"{Job.redis_job_namespace_prefix}{job_id}"
        with connection.pipeline() as pipeline:
            self._remove_records(pipeline, answer)
            if written := [name for name in STARTED_FIELDS if name.encode() not in before]:
                pipeline.hdel(job_key, *written)
            if kept := {name: before[name.encode()] for name in STARTED_FIELDS if name.encode() in before}:
                pipeline.hset(job_key, mapping=kept)  # type: ignore[arg-type]
            pipeline.lpush(answer[0].decode(), job_id)
            pipeline.execute()

    def _remove_records(self, pipeline: Pipeline, answer: list[Any]) -> None:
        job_id = answer[1].decode()
        composite = f"{job_id}:{self.execution_id}"
        pipeline.delete(f"{EXECUTION_KEY_PREFIX}{composite}")
        pipeline.zrem(f"{EXECUTIONS_KEY_PREFIX}{job_id}", self.execution_id)
        pipeline.zrem(answer[4].decode(), composite)
        pipeline.srem(WORKER_EXECUTIONS_KEY_TEMPLATE.format(self.worker.name), composite)


STARTED_FIELDS = ("last_heartbeat", "status", "started_at", "worker_name")
"""The job's fields `START_SCRIPT` writes."""
