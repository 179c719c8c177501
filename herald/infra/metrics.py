"""Prometheus metrics, kept in Redis and exposed by the API at `GET /metrics`.

Counters and histograms are Redis hashes (`metrics:<name>`) that any process adds to with HINCRBY:
the API when it queues, each RQ work-horse when its job ends (callbacks in `herald.jobs.queues`) and the
delivery task. prometheus_client's multiprocess mode would need one shared directory for the API and
all workers (not so across containers) and leaves one file per process behind, so one per job with
RQ's forking worker; Redis is already shared by every process and outlives them all. Gauges (queue
depths, registry sizes, live workers) are read from RQ's own keys at scrape time, in one pipeline.

Recording never fails a job: a Redis error while counting is logged and the count is lost.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job
from rq.registry import BaseRegistry, FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from herald.infra import keys
from settings import QUEUE_NAMES

log = logging.getLogger("metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
KEY_PREFIX = keys.METRICS_PREFIX
DELAYED_JOBS_KEY = keys.DELAYED_JOBS
"""rq-scheduler's sorted set of delayed jobs (the same key as `herald.jobs.store.DELAYED_JOBS_KEY`)."""
REGISTRIES: dict[str, type[BaseRegistry]] = {
    "started": StartedJobRegistry,
    "scheduled": ScheduledJobRegistry,
    "failed": FailedJobRegistry,
}
WORKERS_KEY = keys.WORKERS
ALIVE_WORKERS_SCRIPT = """
local alive = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  alive = alive + redis.call('EXISTS', key)
end
return alive
"""
"""RQ's worker set keeps a worker until someone cleans it; its key expires without a heartbeat."""


def _field(values: Iterable[str]) -> str:
    return json.dumps(list(values), separators=(",", ":"))


@dataclass(frozen=True)
class Counter:
    name: str
    documentation: str
    labels: tuple[str, ...]

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.name

    def inc(self, connection: Redis, *values: str, amount: int = 1) -> None:
        """Add one (or `amount`); `connection` may be a pipeline, which then carries the increment."""
        connection.hincrby(self.key, _field(values), amount)

    def family(self, raw: dict[bytes, bytes]) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for field, value in sorted(raw.items()):
            family.add_metric(json.loads(field), float(value))
        return family


@dataclass(frozen=True)
class Histogram:
    name: str
    documentation: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...]

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.name

    def observe(self, connection: Redis, value: float, *values: str) -> None:
        """Count `value` in its bucket (not cumulative: summed up at scrape time) and add it to the sum."""
        bound = next((bound for bound in self.buckets if value <= bound), math.inf)
        connection.hincrby(self.key, _field((*values, str(bound))), 1)
        connection.hincrbyfloat(self.key, _field((*values, "sum")), value)

    def family(self, raw: dict[bytes, bytes]) -> Metric:
        series: dict[tuple[str, ...], dict[str, float]] = defaultdict(dict)
        for field, value in raw.items():
            *labels, part = json.loads(field)
            series[tuple(labels)][part] = float(value)
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, parts in sorted(series.items()):
            cumulative, buckets = 0.0, []
            for bound in (*self.buckets, math.inf):
                cumulative += parts.get(str(bound), 0.0)
                buckets.append(("+Inf" if bound == math.inf else str(bound), cumulative))
            family.add_metric(list(labels), buckets, parts.get("sum", 0.0))
        return family


DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

JOBS_ENQUEUED = Counter("rq_jobs_enqueued_total", "Jobs submitted, to a queue or to the delay schedule.", ("task",))
JOBS_FINISHED = Counter("rq_jobs_finished_total", "Jobs that returned.", ("task",))
JOBS_FAILED = Counter("rq_jobs_failed_total", "Jobs that failed for good: permanent error or no retry left.", ("task",))
JOBS_RETRIED = Counter("rq_jobs_retried_total", "Failed attempts that RQ retries.", ("task",))
JOB_DURATION = Histogram("rq_job_duration_seconds", "Run time of each attempt.", ("task",), DURATION_BUCKETS)
JOB_WAIT = Histogram("rq_job_wait_seconds", "From enqueued to started, per attempt.", ("queue",), WAIT_BUCKETS)
NOTIFICATIONS_CREATED = Counter("notification_created_total", "Channel deliveries created.", ("channel",))
NOTIFICATIONS_DELIVERED = Counter(
    "notification_delivered_total",
    "Channel deliveries settled, by outcome: delivered, failed, expired, canceled or skipped.",
    ("channel", "status"),
)
NOTIFICATION_RETRIES = Counter(
    "notification_retry_total", "Failed delivery attempts that will be retried.", ("channel",)
)
NOTIFICATION_RETRIES_EXHAUSTED = Counter(
    "notification_retry_exhausted_total", "Deliveries failed with a transient error and no attempt left.", ("channel",)
)
QUEUE_REJECTED = Counter("queue_rejected_total", "Requests refused before anything was queued.", ("queue",))

COUNTERS = (
    JOBS_ENQUEUED,
    JOBS_FINISHED,
    JOBS_FAILED,
    JOBS_RETRIED,
    NOTIFICATIONS_CREATED,
    NOTIFICATIONS_DELIVERED,
    NOTIFICATION_RETRIES,
    NOTIFICATION_RETRIES_EXHAUSTED,
    QUEUE_REJECTED,
)
HISTOGRAMS = (JOB_DURATION, JOB_WAIT)


def task_name(job: Job) -> str:
    return str(job.meta.get("task") or job.func_name)


def job_submitted(pipeline: Redis, job: Job) -> None:
    """Count a job in the transaction that submits it, so it is counted exactly when it exists."""
    JOBS_ENQUEUED.inc(pipeline, task_name(job))


def jobs_submitted(pipeline: Redis, task: str, count: int) -> None:
    """Count `count` jobs of `task` in the transaction that submits them."""
    JOBS_ENQUEUED.inc(pipeline, task, amount=count)


def job_ended(job: Job, connection: Redis, outcome: str) -> None:
    """From RQ's callbacks in the work-horse: `finished`, `retried` or `failed`; duration and wait."""
    counter = {"finished": JOBS_FINISHED, "retried": JOBS_RETRIED, "failed": JOBS_FAILED}[outcome]
    with _recording(connection) as pipeline:
        counter.inc(pipeline, task_name(job))
        if job.started_at and job.ended_at:
            JOB_DURATION.observe(pipeline, (job.ended_at - job.started_at).total_seconds(), task_name(job))
        if job.started_at and job.enqueued_at:
            wait = max(0.0, (job.started_at - job.enqueued_at).total_seconds())
            JOB_WAIT.observe(pipeline, wait, job.origin)


def delivery_settled(connection: Redis, channel: str, status: str, exhausted: bool = False) -> None:
    """A delivery reached an end: `delivered`, `failed` (`exhausted`: out of attempts), `expired`, `canceled`."""
    with _recording(connection) as pipeline:
        NOTIFICATIONS_DELIVERED.inc(pipeline, channel, status)
        if exhausted:
            NOTIFICATION_RETRIES_EXHAUSTED.inc(pipeline, channel)


def delivery_retrying(connection: Redis, channel: str) -> None:
    with _recording(connection) as pipeline:
        NOTIFICATION_RETRIES.inc(pipeline, channel)


def rejected(connection: Redis, queue: str) -> None:
    with _recording(connection) as pipeline:
        QUEUE_REJECTED.inc(pipeline, queue)


_deferred: ContextVar[Pipeline | None] = ContextVar("metrics_deferred", default=None)


@contextmanager
def deferred(pipeline: Pipeline) -> Iterator[None]:
    """Metrics recorded in this thread within the block go onto `pipeline`, which the caller sends
    (the worker, with its write of the job's end: one round trip less per job), not in their own."""
    token = _deferred.set(pipeline)
    try:
        yield
    finally:
        _deferred.reset(token)


@contextmanager
def _recording(connection: Redis) -> Iterator[Redis]:
    """A pipeline whose commands are sent on leaving the block; a Redis error then is logged, not raised."""
    target = _deferred.get()
    if target is not None:
        yield target
        return
    with connection.pipeline(transaction=False) as pipeline:
        yield pipeline
        try:
            pipeline.execute()
        except RedisError as exc:
            log.warning("metrics not recorded: %s", type(exc).__name__)


def alive_workers(connection: Redis) -> int:
    """Workers whose heartbeat key has not expired."""
    return int(connection.eval(ALIVE_WORKERS_SCRIPT, 1, WORKERS_KEY))


class RedisCollector(Collector):
    """Reads every series from Redis at scrape time, in one pipeline."""

    def __init__(self, connection: Redis) -> None:
        self.connection = connection

    def collect(self) -> Iterator[Metric]:
        with self.connection.pipeline(transaction=False) as pipeline:
            for name in QUEUE_NAMES:
                pipeline.llen(Queue.redis_queue_namespace_prefix + name)
                for registry_class in REGISTRIES.values():
                    pipeline.zcard(registry_class.key_template.format(name))
            pipeline.zcard(DELAYED_JOBS_KEY)
            pipeline.eval(ALIVE_WORKERS_SCRIPT, 1, WORKERS_KEY)
            for metric in (*COUNTERS, *HISTOGRAMS):
                pipeline.hgetall(metric.key)
            replies = iter(pipeline.execute())
        depth = GaugeMetricFamily("rq_queue_depth", "Jobs waiting on each queue.", labels=("queue",))
        sizes = GaugeMetricFamily(
            "rq_registry_size", "Jobs in RQ's registries, per queue.", labels=("queue", "registry")
        )
        for name in QUEUE_NAMES:
            depth.add_metric([name], next(replies))
            for registry in REGISTRIES:
                sizes.add_metric([name, registry], next(replies))
        yield depth
        yield sizes
        yield GaugeMetricFamily("rq_delayed_jobs", "Delayed jobs waiting for their time (rq-scheduler).", next(replies))
        yield GaugeMetricFamily("rq_workers_alive", "Workers with a live heartbeat.", next(replies))
        for metric in (*COUNTERS, *HISTOGRAMS):
            yield metric.family(next(replies))


def exposition(connection: Redis) -> bytes:
    """Every series in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(connection))
    return generate_latest(registry)
