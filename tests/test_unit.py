"""Fast unit tests: pure functions, and the queues on fakeredis with an in-process worker."""

from __future__ import annotations

import itertools
import mmap
import os
import random
import time
from collections.abc import Callable

import fakeredis
import pytest
import rq.registry
from pydantic import ValidationError
from rq import Callback, Queue, SimpleWorker, Worker
from rq.job import JobStatus

import worker
from herald import mailsink
from herald.exceptions import UnknownTaskError
from herald.jobs import enqueue, queues, retries, store, views
from herald.notify import notifications
from herald.rq_seam import recovery
from herald.schemas import EmailArgs
from settings import Settings, get_settings
from tests import fixtures


def test_backoff_doubles_up_to_the_cap_without_jitter() -> None:
    settings = Settings(retry_max=6, retry_base_seconds=60, retry_cap_seconds=600, retry_jitter=0)
    assert retries.backoff_intervals(settings) == [60, 120, 240, 480, 600, 600]


def test_backoff_jitter_stays_within_its_fraction_and_varies() -> None:
    settings = Settings(retry_max=3, retry_base_seconds=100, retry_cap_seconds=10_000, retry_jitter=0.5)
    samples = [retries.backoff_intervals(settings, random.Random(seed)) for seed in range(50)]
    for delays in samples:
        assert delays >= [100, 200, 400]
        assert all(base <= delay <= base * 1.5 for base, delay in zip([100, 200, 400], delays, strict=False))
    assert len({tuple(delays) for delays in samples}) > 1


def test_no_retries_configured_means_no_retry_policy() -> None:
    assert retries.retry_policy(Settings(retry_max=0)) is None


def test_email_args_accept_recipient_email_alias_and_refuse_header_injection() -> None:
    assert (
        EmailArgs.model_validate({"recipient_email": "a@example.com", "subject": "s", "body": ""}).to == "a@example.com"
    )
    with pytest.raises(ValidationError, match="line breaks"):
        EmailArgs(to="a@example.com", subject="hi\r\nBcc: x@example.com", body="")


def test_unknown_task_is_refused_naming_the_known_ones(fake_redis: fakeredis.FakeRedis) -> None:
    with pytest.raises(UnknownTaskError) as raised:
        enqueue.enqueue_task(Settings(), "os.system", {"command": "true"})
    assert raised.value.known == ["await_completion", "noop", "purge_expired", "send_email"]
    assert all(Queue(name, connection=fake_redis).count == 0 for name in ("high", "default", "low"))


def test_task_arguments_are_validated_before_enqueue(fake_redis: fakeredis.FakeRedis) -> None:
    with pytest.raises(ValidationError):
        enqueue.enqueue_task(Settings(), "send_email", {"to": "not-an-address", "subject": "s", "body": "b"})
    assert Queue("default", connection=fake_redis).count == 0


def test_enqueue_puts_the_job_on_the_priority_queue_with_backoff(fake_redis: fakeredis.FakeRedis) -> None:
    job = enqueue.enqueue_task(Settings(), "noop", {}, "high")
    assert job.origin == "high"
    assert Queue("high", connection=fake_redis).job_ids == [job.id]
    assert job.retries_left == 4 and job.retry_intervals == [1, 2, 4, 4]
    assert views.job_view(job).task == "noop"


def test_worker_takes_high_before_default_before_low(fake_redis: fakeredis.FakeRedis) -> None:
    low = [enqueue.enqueue_task(Settings(), "noop", {}, "low") for _ in range(3)]
    default = enqueue.enqueue_task(Settings(), "noop", {}, "default")
    high = enqueue.enqueue_task(Settings(), "noop", {}, "high")
    SimpleWorker(["high", "default", "low"], connection=fake_redis).work(burst=True)
    jobs = [store.fetch_job(Settings(), job.id) for job in (high, default, *low)]
    assert all(job.get_status() == JobStatus.FINISHED for job in jobs)
    started = [job.started_at for job in jobs]
    assert started == sorted(started)  # type: ignore[type-var]


def _enqueue_fixture(connection: fakeredis.FakeRedis, func: Callable[[], None]) -> str:
    queue = Queue("default", connection=connection)
    job = queue.enqueue(func, retry=retries.retry_policy(Settings()), on_failure=Callback(queues.on_job_failure))
    return job.id


def test_permanent_error_fails_at_once_with_its_error_recorded(fake_redis: fakeredis.FakeRedis) -> None:
    job_id = _enqueue_fixture(fake_redis, fixtures.fail_permanently)
    SimpleWorker(["default"], connection=fake_redis).work(burst=True)
    view = views.job_view(store.fetch_job(Settings(), job_id))
    assert (view.status, view.retries_left) == ("failed", 0)
    assert view.error is not None and (view.error.type, view.error.message) == ("PermanentError", "recipient rejected")


def test_transient_error_is_scheduled_for_retry(fake_redis: fakeredis.FakeRedis) -> None:
    job_id = _enqueue_fixture(fake_redis, fixtures.fail_transiently)
    SimpleWorker(["default"], connection=fake_redis).work(burst=True)
    view = views.job_view(store.fetch_job(Settings(), job_id))
    assert (view.status, view.retries_left) == ("scheduled", 3)
    assert view.error is not None and view.error.type == "TransientError"


def test_failed_jobs_are_listed_newest_first_across_queues(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs fail one after another, seconds apart (RQ scores its failed registry in whole seconds)."""
    clock = itertools.count(int(time.time()))  # each reading a second later
    monkeypatch.setattr(rq.registry, "current_timestamp", lambda: next(clock))
    ids: list[str] = []
    for name in ("low", "high", "default"):  # oldest failure first
        ids.append(Queue(name, connection=fake_redis).enqueue(fixtures.fail_permanently).id)
        SimpleWorker([name], connection=fake_redis).work(burst=True)
    total, jobs = views.failed_jobs(Settings(), None, 0, 2)
    assert total == 3 and [job.id for job in jobs] == [ids[2], ids[1]]
    total, jobs = views.failed_jobs(Settings(), None, 2, 2)
    assert [job.id for job in jobs] == [ids[0]]
    assert views.failed_jobs(Settings(), "low", 0, 10)[0] == 1


def test_smtp_unreachable_is_retried_and_no_smtp_host_fails_at_once(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closed port (connection refused) may open again: transient. No server configured: permanent."""
    arguments = {"to": "ann@example.com", "subject": "Hi", "body": "x"}
    monkeypatch.setenv("SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("SMTP_PORT", str(mailsink.free_port()))  # nothing listens there
    get_settings.cache_clear()  # the job runs in this process: its entry point (`tasks.send_email`) reads them
    unreachable = enqueue.enqueue_task(Settings(), "send_email", arguments)
    SimpleWorker(["default"], connection=fake_redis).work(burst=True)
    view = views.job_view(store.fetch_job(Settings(), unreachable.id))
    assert (view.status, view.retries_left) == ("scheduled", 3)
    assert view.error is not None and view.error.type == "TransientError" and "unreachable" in view.error.message

    monkeypatch.delenv("SMTP_HOST")
    get_settings.cache_clear()
    unconfigured = enqueue.enqueue_task(Settings(), "send_email", arguments)
    SimpleWorker(["default"], connection=fake_redis).work(burst=True)
    view = views.job_view(store.fetch_job(Settings(), unconfigured.id))
    assert (view.status, view.retries_left) == ("failed", 0)
    assert view.error is not None and (view.error.type, view.error.message) == (
        "PermanentError",
        "SMTP_HOST is not configured",
    )


def test_worker_class_is_simple_on_windows_and_by_default_and_forking_on_request() -> None:
    assert issubclass(worker.worker_class(Settings(worker_class="fork"), "win32"), SimpleWorker)
    assert issubclass(worker.worker_class(Settings(worker_class="simple"), "linux"), SimpleWorker)
    assert issubclass(worker.worker_class(Settings(worker_class="fork"), "linux"), Worker)


def test_a_delivery_update_sets_fields_of_a_record_and_never_recreates_a_gone_one(
    fake_redis: fakeredis.FakeRedis,
) -> None:
    key = notifications.delivery_key("d1")
    fake_redis.hset(key, mapping=notifications.encode({"status": "sending", "attempts": 1}))
    notifications.update(fake_redis, "d1", status="delivered", next_retry_at=None)
    notifications.update(fake_redis, "gone", status="delivered")

    record = notifications.decode(fake_redis.hgetall(key))
    assert record is not None and record["status"] == "delivered" and record["attempts"] == 1
    assert record["next_retry_at"] is None and record["updated_at"]
    assert not fake_redis.exists(notifications.delivery_key("gone"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
def test_a_forked_child_reads_its_own_peak_resident_memory() -> None:
    """The memory check after each job reads the process's peak: a forked child (a pool process) grows its
    own, and its parent's is left as it was."""
    parent_mib = recovery.peak_resident_mib()
    assert parent_mib is not None
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        before = recovery.peak_resident_mib() or 0
        grown = bytearray(200 * 2**20)  # zero pages are not resident until written
        grown[:: mmap.PAGESIZE] = b"x" * len(grown[:: mmap.PAGESIZE])
        os.write(writing, str((recovery.peak_resident_mib() or 0) - before).encode())
        os._exit(0)
    os.close(writing)
    with os.fdopen(reading) as answer:
        child_growth_mib = float(answer.read())
    os.waitpid(child, 0)
    assert child_growth_mib > 150
    assert (recovery.peak_resident_mib() or 0) < parent_mib + 50
