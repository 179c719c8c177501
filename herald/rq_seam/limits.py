"""Per-destination concurrency limits: RQ 3.0's own `RateLimit`, one key per receiver.

More worker concurrency must not flood one receiver. A delivery job to a webhook host carries
`RateLimit("webhook:<host>", WEBHOOK_HOST_CONCURRENCY)`, and one to the SMTP server (a notification's
email or a `send_email` job) `RateLimit("smtp:<host>:<port>", SMTP_CONCURRENCY)`. RQ counts a job
against its key from the moment it is let onto its queue until its end is recorded (finished, failed,
or scheduled for a retry); a job over the cap waits in `rq:rl:<key>:rate_limited`, in no queue, with
status `rate_limited`, and is pushed onto its queue when a job of the same key ends. So the limit is
kept at enqueue time: the claim script of `recovery.ClaimingQueue` pops only jobs that hold a slot, and
the workers release slots through RQ's own end-of-job code.

RQ refuses a rate-limited job in a caller's pipeline (`enqueue_job`), because a later save of the job
on that pipeline would overwrite the status its promotion writes. The service never saves a job after
submitting it, so `submit` here writes RQ's rate-limited enqueue into the caller's transaction; the
API's asyncio path, whose commands are recorded and applied by one Lua script, gets RQ's slot script
appended to that script (`execute_async`): the job and its slot are one command, all or none.
"""

from __future__ import annotations

import hashlib
import time
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from redis import Redis
from redis import asyncio as aioredis
from redis.client import Pipeline
from rq import Queue, RateLimit
from rq.job import Job, JobStatus
from rq.rate_limit import ACQUIRE_AND_ENQUEUE_SCRIPT, RateLimitRegistry
from rq.utils import now, utcformat

from herald.infra import keys
from herald.rq_seam import replay
from settings import Settings

REPLAY_AND_ACQUIRE_SCRIPT = (
    """
local i = 6
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + count))
  i = i + count + 1
end
"""
    + ACQUIRE_AND_ENQUEUE_SCRIPT
)
"""`replay.REPLAY_SCRIPT` on the words after RQ's five arguments, then RQ's own slot script on those."""
_REPLAY_AND_ACQUIRE_SHA = hashlib.sha1(REPLAY_AND_ACQUIRE_SCRIPT.encode()).hexdigest()


def for_webhook(url: str, settings: Settings) -> RateLimit:
    """The limit of deliveries to the host of `url` (its name, lower case: every port of one machine)."""
    host = (urlsplit(url).hostname or "").lower()
    return RateLimit(keys.webhook_limit(host), settings.webhook_host_concurrency)


def for_smtp(settings: Settings) -> RateLimit | None:
    """The limit of deliveries to the configured SMTP server; None when none is configured (the job
    fails at once, permanently, and needs no slot)."""
    if not settings.smtp_host:
        return None
    return RateLimit(keys.smtp_limit(settings.smtp_host.lower(), settings.smtp_port), settings.smtp_concurrency)


def for_channel(channel: str, target: str | None, settings: Settings) -> RateLimit | None:
    """The limit of one delivery of a notification over `channel` to `target`; in-app ones have none."""
    if channel == "webhook" and target:
        return for_webhook(target, settings)
    if channel == "email":
        return for_smtp(settings)
    return None


def submit(queue: Queue, job: Job, pipeline: Pipeline) -> None:
    """Write a rate-limited job in the caller's MULTI/EXEC: saved `rate_limited`, added to the key's
    waiting set, and promoted onto `queue` in the same transaction if its key has a free slot."""
    pipeline.sadd(queue.redis_queues_keys, queue.key)
    queue._enqueue_rate_limited_job(job, pipeline=pipeline)


def submit_recorded(queue: Queue, job: Job, pipeline: Pipeline) -> None:
    """`submit` without the promotion, for a recorded pipeline replayed by a script: `execute_async`
    applies it and asks for the slot in the same script."""
    assert job.rate_limit_key and job.rate_limit_concurrency
    job.redis_server_version = queue.get_redis_server_version()
    job.origin = queue.name
    if job.timeout is None:
        job.timeout = queue._default_timeout
    job._status = JobStatus.RATE_LIMITED
    registry = _registry(job.rate_limit_key, job.connection)
    pipeline.sadd(queue.redis_queues_keys, queue.key)
    registry.register(job.rate_limit_concurrency, pipeline)
    job.save(pipeline=pipeline)
    registry.add_to_rate_limited(job.id, pipeline)


@lru_cache(maxsize=64)
def _registry(key: str, connection: Redis) -> RateLimitRegistry:
    """The registry of a key, made once: RQ's constructor registers four scripts, a tenth of an enqueue.
    Only its key names and pipeline methods are used (its `concurrency` is read once and cached)."""
    return RateLimitRegistry(key, connection=connection)


async def execute_async(
    client: aioredis.Redis, recorded: Pipeline, job: Job, replicas: int = 0, timeout_ms: int = 0
) -> None:
    """Apply `recorded` (holding `submit_recorded`'s commands) and ask for `job`'s slot as RQ's
    `acquire_and_enqueue` does, in one script (`replay.execute_async`, with its `WAIT` for
    replicas); the job's status follows.

    One command, so a Redis failure cannot leave a job written whose request failed: a second command
    for the slot could fail after the job was saved, and the client, answered 503, would send it again.
    """
    assert job.rate_limit_key and job.rate_limit_concurrency
    registry, enqueued_at = _registry(job.rate_limit_key, job.connection), now()
    leading: tuple[Any, ...] = (2, registry.allowed_key, registry.rate_limited_key, job.rate_limit_concurrency)
    leading += (time.time(), utcformat(enqueued_at), Queue.redis_queue_namespace_prefix, Job.redis_job_namespace_prefix)
    script = replay.Replay(REPLAY_AND_ACQUIRE_SCRIPT, _REPLAY_AND_ACQUIRE_SHA, leading)
    promoted = await replay.execute_async(client, recorded, replicas, timeout_ms, script)
    if job.id.encode() in promoted:
        job._status, job.enqueued_at = JobStatus.QUEUED, enqueued_at


def submit_many(queue: Queue, model: Job, ids: list[str], pipeline: Pipeline) -> None:
    """The end of a batch of jobs made like `model` (their hashes written `rate_limited`): all added to
    the key's waiting set in their order, then as many promoted as the key has free slots."""
    assert model.rate_limit_key and model.rate_limit_concurrency
    registry = RateLimitRegistry.from_job(model)
    start = time.time()
    registry.register(model.rate_limit_concurrency, pipeline)
    pipeline.zadd(registry.rate_limited_key, {job_id: start + n * 1e-5 for n, job_id in enumerate(ids)})
    registry.acquire_and_enqueue(model.rate_limit_concurrency, pipeline=pipeline)
