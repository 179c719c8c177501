"""A job popped and started in one script, for a worker that runs its jobs in its own process.

RQ pops a job in one round trip, reads its hash in a second (the claim script does both) and records its
start in a third: `prepare_execution` (the execution's hash, its job's execution registry, the started
registry, the worker's execution index) and `prepare_job_execution` (the worker busy, the job's status,
start, heartbeat and worker). `START_SCRIPT` pops, reads and writes that start in one script, with the
same keys, values and TTLs as the two-step start (`tests/test_starts.py` compares every key). A job so
started needs no claim: it is in the started registry from the moment it leaves its queue, and a worker
that dies then is recovered as one that died while running it. Written for RQ 3.0's `Execution.create` and
`Job.prepare_for_execution` (`herald.rq_seam` checks the version).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import uuid4

from redis import Redis
from rq import Queue
from rq.defaults import RQ_KEY_PREFIX
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE, Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.utils import now, utcformat

START_SCRIPT = """
local job_prefix, execution_id, moment, stamp, iso = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local worker, worker_key, worker_executions = ARGV[6], ARGV[7], ARGV[8]
local interval, grace, worker_ttl, beat = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12]
for i = 1, #KEYS do
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
"""KEYS: the queues, in priority order. ARGV: the job key prefix, the execution's id, the moment (as a
timestamp, as seconds, as RQ's date string), the worker's name, key and execution index, its job
heartbeat interval and grace, its own key's least TTL, whether to beat (1) now, the prefixes of the keys
of executions, of a job's executions, of started registries and of queues. Answers the queue, the job's
id and its hash as read before the start (empty: deleted while queued, nothing written), then the TTL
the worker's key was given (if it beat) and the started registry's key."""
START_SHA = hashlib.sha1(START_SCRIPT.encode()).hexdigest()
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
    execution_id: str = field(default_factory=lambda: uuid4().hex)
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
        job_id = answer[1].decode()
        composite = f"{job_id}:{self.execution_id}"
        with connection.pipeline() as pipeline:
            pipeline.delete(f"{EXECUTION_KEY_PREFIX}{composite}")
            pipeline.zrem(f"{EXECUTIONS_KEY_PREFIX}{job_id}", self.execution_id)
            pipeline.zrem(answer[4].decode(), composite)
            pipeline.srem(WORKER_EXECUTIONS_KEY_TEMPLATE.format(self.worker.name), composite)
            pipeline.execute()
