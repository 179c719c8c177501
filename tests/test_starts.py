"""A job popped and started in one script (`herald.rq_seam.starts`) is left as the two-step start leaves it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from redis import Redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.suspension import suspend

from herald.rq_seam import recovery
from herald.rq_seam.recovery import ClaimingQueue, RecoveringSimpleWorker
from tests import fixtures

Snapshot = dict[str, Any]
DATE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z?")
TIMESTAMP = re.compile(r"\d{10}(\.\d+)?")
DURATION = re.compile(r"0\.\d+")
"""A job's run time (the worker's `total_working_time`), in seconds."""


def _text(value: Any, *execution_ids: str) -> Any:
    """`value` with the run's own parts (execution ids, dates, timestamps, durations) named instead."""
    if isinstance(value, bytes):
        value = value.decode(errors="backslashreplace")
        for execution_id in execution_ids:
            value = value.replace(execution_id, "<execution>")
        if DURATION.fullmatch(value):
            return "<duration>"
        return "<timestamp>" if TIMESTAMP.fullmatch(value) else DATE.sub("<date>", value)
    return value


def _snapshot(redis: Redis, *execution_ids: str) -> Snapshot:
    """Every key: its type, content (zset scores as seconds from now) and TTL."""
    found: list[bytes] = redis.keys("*")  # type: ignore[assignment]
    kinds: list[bytes] = [redis.type(key) for key in found]  # type: ignore[misc]
    return {
        _text(key, *execution_ids): (kind.decode(), _content(redis, key, kind.decode(), execution_ids), redis.ttl(key))
        for key, kind in zip(found, kinds, strict=True)
    }


def _content(redis: Redis, key: bytes, kind: str, execution_ids: tuple[str, ...]) -> Any:
    if kind == "hash":
        return {_text(name, *execution_ids): _text(value, *execution_ids) for name, value in redis.hgetall(key).items()}
    if kind == "stream":  # a job's results: the entries' fields, without their ids (times)
        entries: list[tuple[bytes, dict[bytes, bytes]]] = redis.xrange(key)  # type: ignore[assignment]
        return [
            {_text(name, *execution_ids): _text(value, *execution_ids) for name, value in fields.items()}
            for _, fields in entries
        ]
    if kind == "zset":
        scored: list[tuple[bytes, float]] = redis.zrange(key, 0, -1, withscores=True)  # type: ignore[assignment]
        return {_text(member, *execution_ids): round(score - time.time()) for member, score in scored}
    if kind == "set":
        return sorted(_text(member, *execution_ids) for member in redis.smembers(key))
    if kind == "list":
        return [_text(item, *execution_ids) for item in redis.lrange(key, 0, -1)]
    return _text(redis.get(key), *execution_ids)


def _close(ours: Any, theirs: Any) -> bool:
    """Equal, numbers (seconds) within one of each other: the two starts ran moments apart."""
    if isinstance(ours, int) and isinstance(theirs, int):
        return abs(ours - theirs) <= 1
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(_close(ours[key], theirs[key]) for key in ours)
    if isinstance(ours, list | tuple) and isinstance(theirs, list | tuple):
        return len(ours) == len(theirs) and all(_close(a, b) for a, b in zip(ours, theirs, strict=True))
    return bool(ours == theirs)


def _two_steps(worker: RecoveringSimpleWorker) -> tuple[Job, Execution]:
    """The claim, then the start written in a transaction of its own (as before `starts`)."""
    popped = ClaimingQueue.dequeue_any(worker.queues, None, connection=worker.connection)
    assert popped is not None
    return popped[0], worker.prepare_execution(popped[0])


def _one_script(worker: RecoveringSimpleWorker) -> tuple[Job, Execution]:
    with recovery.pops_start(worker):
        popped = ClaimingQueue.dequeue_any(worker.queues, None, connection=worker.connection)
    assert popped is not None
    return popped[0], worker.prepare_execution(popped[0])


def _start(redis: Redis, how: Callable[[RecoveringSimpleWorker], tuple[Job, Execution]], **case: Any) -> Any:
    """What `how` changed in Redis, starting a job of a fresh queue for a fresh worker, and what it set on
    the job and the worker."""
    redis.flushdb()
    Queue("default", connection=redis).enqueue(fixtures.pid, job_id="the-job", job_timeout=case["timeout"])
    worker = RecoveringSimpleWorker(["default"], connection=redis, name="the-worker", job_monitoring_interval=10)
    worker.heartbeat_grace = 4
    worker.register_birth()
    if case["beat_just_sent"]:
        worker.heartbeat()
    before = _snapshot(redis)
    job, execution = how(worker)
    after = _snapshot(redis, execution.id)
    changed = {key: after.get(key) for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    in_memory = (job.get_status(refresh=False), job.worker_name, job.started_at == job.last_heartbeat)
    return changed, in_memory, (worker.get_state(), set(worker.executions) == {execution.id}, worker._beat_ttl)


@pytest.mark.parametrize("beat_just_sent", [False, True], ids=["heartbeat due", "heartbeat just sent"])
@pytest.mark.parametrize("timeout", [None, 3], ids=["default timeout", "timeout under the heartbeat interval"])
def test_a_job_started_by_its_pop_is_left_as_the_two_step_start_leaves_it(
    redis: Redis, beat_just_sent: bool, timeout: int | None
) -> None:
    ours = _start(redis, _one_script, beat_just_sent=beat_just_sent, timeout=timeout)
    theirs = _start(redis, _two_steps, beat_just_sent=beat_just_sent, timeout=timeout)
    assert _close(ours, theirs), f"{ours}\n!=\n{theirs}"
    changed, in_memory, _ = ours
    assert in_memory == (JobStatus.STARTED, "the-worker", True)
    assert changed["rq:job:the-job"][1]["status"] == "started"
    assert "rq:wip:default" in changed and "rq:execution:the-job:<execution>" in changed
    assert "rq:queue:default" in changed and changed["rq:queue:default"] is None, "popped"


def test_a_job_deleted_while_queued_is_not_started_by_its_pop(redis: Redis) -> None:
    job = Queue("default", connection=redis).enqueue(fixtures.pid)
    job.delete(remove_from_queue=False)
    worker = RecoveringSimpleWorker(["default"], connection=redis, name="the-worker")
    with recovery.pops_start(worker):
        assert ClaimingQueue.dequeue_any(worker.queues, None, connection=redis) is None
    assert redis.keys("rq:execution*") == [] and redis.zcard("rq:wip:default") == 0


def test_a_job_that_cannot_be_read_leaves_no_start_behind(redis: Redis) -> None:
    """As RQ's pop, the error goes to the worker's handlers and the job is dropped; so is the start
    the script wrote for it."""
    job = Queue("default", connection=redis).enqueue(fixtures.pid)
    redis.hset(job.key, "created_at", "not a date")
    worker = RecoveringSimpleWorker(["default"], connection=redis, name="the-worker")
    with pytest.raises(ValueError), recovery.pops_start(worker):
        ClaimingQueue.dequeue_any(worker.queues, None, connection=redis)
    assert redis.keys("rq:execution*") == [] and redis.zcard("rq:wip:default") == 0
    assert redis.scard("rq:worker:the-worker:executions") == 0 and not worker.executions


def _end_and_next(redis: Redis, folds: bool, stops: bool = False) -> Any:
    """What the end of a first job and the start of a second changed in Redis, with the second popped by
    the first's end script (`folds`) or by a pop of its own; `stops`: the worker stops after the first."""
    redis.flushdb()
    queue = Queue("default", connection=redis)
    for job_id in ("first", "second"):
        queue.enqueue(fixtures.pid, job_id=job_id)
    worker = RecoveringSimpleWorker(["default"], connection=redis, name="the-worker", job_monitoring_interval=10)
    worker.heartbeat_grace = 4
    if not folds:
        worker.next_start = lambda: None  # type: ignore[method-assign]
    worker.register_birth()
    first = worker.dequeue_job_and_maintain_ttl(None)
    assert first is not None and first[0].id == "first"
    ids = [worker._started[first[0].id].id]
    before = _snapshot(redis, *ids)
    worker.execute_job(*first)
    assert (worker._popped is not None) is folds
    if stops:
        worker.teardown()
    else:
        second = worker.dequeue_job_and_maintain_ttl(None)
        assert second is not None and second[0].id == "second"
        ids.append(worker.prepare_execution(second[0]).id)
    after = _snapshot(redis, *ids)
    return {key: after.get(key) for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def test_a_job_started_by_the_end_of_the_one_before_is_left_as_its_own_pop_leaves_it(redis: Redis) -> None:
    ours, theirs = _end_and_next(redis, folds=True), _end_and_next(redis, folds=False)
    assert _close(ours, theirs), f"{ours}\n!=\n{theirs}"
    assert ours["rq:job:first"][1]["status"] == "finished"
    assert ours["rq:job:second"][1]["status"] == "started" and "rq:execution:second:<execution>" in ours
    assert ours["rq:queue:default"] is None, "both popped"


def test_a_job_popped_by_the_end_of_the_one_before_goes_back_to_its_queue_when_the_worker_stops(
    redis: Redis,
) -> None:
    """A stop that comes while the first job runs leaves the second as a worker that never popped it."""
    ours, theirs = _end_and_next(redis, folds=True, stops=True), _end_and_next(redis, folds=False, stops=True)
    assert _close(ours, theirs), f"{ours}\n!=\n{theirs}"
    assert redis.lrange("rq:queue:default", 0, -1) == [b"second"]
    assert redis.hget("rq:job:second", "status") == b"queued" and redis.zcard("rq:wip:default") == 0
    assert redis.keys("rq:execution*") == []


def test_a_job_popped_by_the_end_of_the_one_before_goes_back_to_its_queue_when_the_worker_is_suspended(
    redis: Redis,
) -> None:
    """`rq suspend` while the first job runs: the worker waits until resumed, the second job in its queue."""
    queue = Queue("default", connection=redis)
    first, second = queue.enqueue(fixtures.pid), queue.enqueue(fixtures.pid)
    worker = RecoveringSimpleWorker(["default"], connection=redis, name="the-worker")
    popped = worker.dequeue_job_and_maintain_ttl(None)
    assert popped is not None and popped[0].id == first.id
    worker.execute_job(*popped)
    assert worker._popped is not None
    suspend(redis)
    with pytest.raises(StopRequested):  # a burst worker stops when suspended
        worker.check_for_suspension(burst=True)
    assert redis.lrange("rq:queue:default", 0, -1) == [second.id.encode()]
    assert second.get_status() == JobStatus.QUEUED and redis.zcard("rq:wip:default") == 0
