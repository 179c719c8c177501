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
from redis.exceptions import NoScriptError
from rq import Queue, RateLimit
from rq.defaults import RQ_KEY_PREFIX
from rq.job import Job, JobStatus
from rq.rate_limit import ACQUIRE_AND_ENQUEUE_SCRIPT, RateLimitRegistry
from rq.utils import current_timestamp, now, utcformat

from herald.infra import keys
from herald.rq_seam import replay
from settings import Settings

REPLAY_AND_ACQUIRE_SCRIPT = replay.replay_loop(6) + ACQUIRE_AND_ENQUEUE_SCRIPT
"""The replay loop on the words after RQ's five arguments, then RQ's own slot script on those."""
_REPLAY_AND_ACQUIRE_SHA = hashlib.sha1(REPLAY_AND_ACQUIRE_SCRIPT.encode()).hexdigest()

WAITING_SCRIPT = """
local waiting = redis.call('LLEN', KEYS[1])
for _, key in ipairs(redis.call('SMEMBERS', ARGV[1])) do
  waiting = waiting + redis.call('ZCARD', ARGV[2] .. key .. ARGV[3])
end
return waiting
"""
"""The length of the queue KEYS[1] plus the jobs waiting for a slot of any key (RQ's `rq:rl-keys`)."""
_WAITING_SHA = hashlib.sha1(WAITING_SCRIPT.encode()).hexdigest()
_WAITING_ARGS = (RateLimitRegistry.rl_keys_key, f"{RQ_KEY_PREFIX}:rl:", ":rate_limited")


def waiting(queue: Queue) -> int:
    """The jobs waiting in `queue`, plus those waiting for a slot, in one round trip: those are in no
    queue until promoted, and a flood to one slow receiver must fill the backlog all the same.

    A waiting job's queue is known only from its hash, so every key's waiting jobs count toward every
    queue (one ZCARD a key, where reading each job's queue would cost one read a job)."""
    try:
        return int(queue.connection.evalsha(_WAITING_SHA, 1, queue.key, *_WAITING_ARGS))
    except NoScriptError:
        return int(queue.connection.eval(WAITING_SCRIPT, 1, queue.key, *_WAITING_ARGS))


async def waiting_async(client: aioredis.Redis, queue: Queue) -> int:
    """`waiting` through the asyncio client `client`."""
    try:
        return int(await client.evalsha(_WAITING_SHA, 1, queue.key, *_WAITING_ARGS))
    except NoScriptError:
        return int(await client.eval(WAITING_SCRIPT, 1, queue.key, *_WAITING_ARGS))


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


def release_arguments(job: Job) -> tuple[list[str], list[Any]]:
    """The keys and words of RQ's `RELEASE_AND_ENQUEUE_SCRIPT` for a job whose end is recorded (what
    RQ's `release_slot` sends), with the key's registry made once per process and the concurrency the
    job carries: RQ makes a registry per call (four scripts registered) and reads the key's
    concurrency from Redis each time."""
    assert job.rate_limit_key
    registry = _registry(job.rate_limit_key, job.connection)
    concurrency = job.rate_limit_concurrency or registry.concurrency
    prefixes = (Queue.redis_queue_namespace_prefix, Job.redis_job_namespace_prefix)
    words = [concurrency, current_timestamp(), utcformat(now()), *prefixes, job.id]
    return [registry.allowed_key, registry.rate_limited_key], words


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
    the key's waiting set in their order, then as many promoted as the key has free slots (the reply
    of its last command, `promoted`)."""
    assert model.rate_limit_key and model.rate_limit_concurrency
    registry = RateLimitRegistry.from_job(model)
    start = time.time()
    registry.register(model.rate_limit_concurrency, pipeline)
    pipeline.zadd(registry.rate_limited_key, {job_id: start + n * 1e-5 for n, job_id in enumerate(ids)})
    registry.acquire_and_enqueue(model.rate_limit_concurrency, pipeline=pipeline)


def promoted(reply: list[bytes | str]) -> set[str]:
    """The ids of the jobs that RQ's slot script (the last command of `submit_many`) promoted."""
    return {job_id.decode() if isinstance(job_id, bytes) else job_id for job_id in reply}
