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
API's asyncio path, whose transaction is replayed by one Lua script (which may not call another), asks
for the slot just after (`promote_async`), as RQ itself does outside a pipeline.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any
from urllib.parse import urlsplit

from redis.client import Pipeline
from redis.exceptions import NoScriptError
from rq import Queue, RateLimit
from rq.job import Job, JobStatus
from rq.rate_limit import ACQUIRE_AND_ENQUEUE_SCRIPT, RateLimitRegistry
from rq.utils import now, utcformat

from herald.infra import keys
from settings import Settings

_ACQUIRE_SHA = hashlib.sha1(ACQUIRE_AND_ENQUEUE_SCRIPT.encode()).hexdigest()


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
    """`submit` without the promotion, for a recorded pipeline replayed by a script: `promote_async`
    asks for the slot after the replay. Meanwhile the job waits like any job over the cap, and any end
    of a job of the same key, or RQ's maintenance, promotes it as well."""
    assert job.rate_limit_key and job.rate_limit_concurrency
    job.redis_server_version = queue.get_redis_server_version()
    job.origin = queue.name
    if job.timeout is None:
        job.timeout = queue._default_timeout
    job._status = JobStatus.RATE_LIMITED
    registry = RateLimitRegistry.from_job(job)
    pipeline.sadd(queue.redis_queues_keys, queue.key)
    registry.register(job.rate_limit_concurrency, pipeline)
    job.save(pipeline=pipeline)
    registry.add_to_rate_limited(job.id, pipeline)


async def promote_async(client: Any, job: Job) -> None:
    """RQ's `acquire_and_enqueue` for `job`'s key through the asyncio client; the job's status follows."""
    assert job.rate_limit_key and job.rate_limit_concurrency
    registry = RateLimitRegistry.from_job(job)
    enqueued_at = now()
    words = [2, registry.allowed_key, registry.rate_limited_key, job.rate_limit_concurrency, time.time()]
    words += [utcformat(enqueued_at), Queue.redis_queue_namespace_prefix, Job.redis_job_namespace_prefix]
    try:
        promoted = await client.evalsha(_ACQUIRE_SHA, *words)
    except NoScriptError:
        promoted = await client.eval(ACQUIRE_AND_ENQUEUE_SCRIPT, *words)
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
