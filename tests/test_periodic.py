"""Periodic jobs: declarations, run times, one enqueue per run across scheduler processes, the
`GET /jobs/periodic` view, and the daily `purge_expired` housekeeping."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.cron import CronJob, CronScheduler, get_cron_job_ids
from rq.job import Job
from rq.registry import StartedJobRegistry

import scheduler
from herald.jobs import cron
from herald.notify.channels import in_app
from herald.notify.channels.base import Message
from settings import QUEUE_NAMES, Settings
from tasks import noop
from tests.conftest import StartProcess
from tests.helpers import stop_process, wait_until
from tests.periodic_jobs import EVERY_SECOND, EVERY_TWO_SECONDS, TEST_JOBS

RUNS = 5
"""Runs of each test job to see while both schedulers are alive."""
T = datetime(2026, 3, 10, 10, 0, 0, 500_000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cron": "* * * * *", "interval": 60}, "not both"),
        ({}, "not both"),
        ({"cron": "61 * * * *"}, "invalid cron"),
        ({"interval": 0}, "at least 1 second"),
        ({"interval": 60, "task": "nope"}, "not a task"),
        ({"interval": 60, "task": "await_completion"}, "not a task"),
        ({"interval": 60, "args": {"surprise": 1}}, "Extra inputs"),
        ({"interval": 60, "name": "Not A Name"}, "must match"),
    ],
)
def test_bad_declarations_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cron.PeriodicJob(**{"name": "job", "task": "noop", **fields})


def test_declared_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        cron.register(cron.PeriodicJob("purge_expired", task="noop", interval=60))


def test_arguments_are_validated_and_kept_as_json() -> None:
    args = {"recipient_email": "a@example.com", "subject": "Weekly", "body": "Hello"}
    job = cron.PeriodicJob("mail", task="send_email", interval=60, args=args)
    assert job.args == {"to": "a@example.com", "subject": "Weekly", "body": "Hello"}


def test_interval_runs_fall_on_the_epoch_grid() -> None:
    assert cron.last_interval_run(60, T) == T.replace(second=0, microsecond=0)
    assert cron.next_run_after(None, 60, T.replace(second=0, microsecond=0)) == T.replace(minute=1, microsecond=0)
    assert cron.next_run_after(None, 86_400, T) == datetime(2026, 3, 11, tzinfo=UTC)


def test_a_job_that_fell_behind_runs_once_for_its_latest_due_time() -> None:
    job = CronJob("default", func_name="tasks.noop", cron="*/5 * * * *")
    job.next_enqueue_time = T - timedelta(hours=1)
    assert cron.latest_due(job, T) == T.replace(microsecond=0)
    due = cron.latest_due(CronJob("default", func_name="tasks.noop", interval=7), T)
    assert due <= T < due + timedelta(seconds=7) and due.timestamp() % 7 == 0


def test_purge_expired_is_declared_daily() -> None:
    job = cron.PERIODIC_JOBS["purge_expired"]
    first = cron.next_run_after(job.cron, job.interval, T)
    assert (job.task, job.priority, job.args) == ("purge_expired", "low", {})
    assert cron.next_run_after(job.cron, job.interval, first) - first == timedelta(days=1)


def _schedulers(redis: Redis, exactly_once: bool) -> list[CronScheduler]:
    make = scheduler.ExactlyOnceCronScheduler if exactly_once else CronScheduler
    schedulers = [make(connection=redis) for _ in range(2)]
    for each in schedulers:
        each.register(noop, "default", interval=60, name="minutely")
    return schedulers


@pytest.mark.parametrize(("exactly_once", "jobs"), [(False, 2), (True, 1)])
def test_rq_cron_enqueues_each_run_in_every_process_ours_once(redis: Redis, exactly_once: bool, jobs: int) -> None:
    """RQ's own scheduler, as NOTES.md found with `rq cron`: two processes, two jobs per run."""
    for each in _schedulers(redis, exactly_once):
        each.enqueue_jobs()
    assert len(get_cron_job_ids("minutely", redis)) == Queue("default", connection=redis).count == jobs


def test_a_failed_enqueue_leaves_the_run_to_another_process(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    failing, other = _schedulers(redis, exactly_once=True)
    monkeypatch.setattr(failing.get_jobs()[0], "enqueue", lambda connection: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.enqueue_jobs()
    assert other.enqueue_jobs() and Queue("default", connection=redis).count == 1


def _periodic_jobs(redis: Redis, name: str) -> list[Job]:
    """Every job in Redis that a run of periodic job `name` enqueued (read apart from RQ's cron history)."""
    ids = [key.decode().removeprefix("rq:job:") for key in redis.scan_iter(match="rq:job:*", _type="hash")]
    return [job for job in Job.fetch_many(ids, connection=redis) if job and job.meta.get("periodic_job") == name]


def _runs_since(redis: Redis, name: str, since: datetime) -> int:
    return sum(datetime.fromisoformat(job.meta["run_at"]) > since for job in _periodic_jobs(redis, name))


def _all_done(redis: Redis) -> bool:
    busy = (
        Queue(name, connection=redis).count + StartedJobRegistry(name, connection=redis).count for name in QUEUE_NAMES
    )
    return not any(busy)


def test_two_scheduler_processes_enqueue_each_run_once(
    client: TestClient, redis: Redis, processes: StartProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    for job in TEST_JOBS:
        monkeypatch.setitem(cron.PERIODIC_JOBS, job.name, job)  # the API knows them, as the schedulers do
    processes("worker.py", wait_for_workers=1)
    pair = [processes("python", "-m", "tests.periodic_scheduler") for _ in range(2)]
    wait_until(lambda: len(CronScheduler.all(redis)) == 2, timeout=30, what="both schedulers to start")
    both_alive = datetime.now(UTC)
    for name in [job.name for job in TEST_JOBS]:
        runs = functools.partial(_runs_since, redis, name, both_alive)
        wait_until(lambda: runs() >= RUNS, timeout=30, what=f"{RUNS} runs of {name}")  # noqa: B023
    assert client.get("/jobs/periodic").json()["schedulers"] == 2
    for process in pair:
        stop_process(process)
    wait_until(lambda: _all_done(redis), what="the worker to run every enqueued job")
    for job in TEST_JOBS:
        _assert_once_per_run(redis, job)
    _assert_view(client, redis)


def _assert_once_per_run(redis: Redis, declared: cron.PeriodicJob) -> None:
    jobs = _periodic_jobs(redis, declared.name)
    run_times = sorted(datetime.fromisoformat(job.meta["run_at"]) for job in jobs)
    assert len(set(run_times)) == len(jobs), f"{declared.name}: a run time was enqueued twice"
    step = declared.interval or 2
    assert all(run.microsecond == 0 and run.second % step == 0 for run in run_times)
    assert {job.id for job in jobs} == set(get_cron_job_ids(declared.name, redis))
    assert {job.get_status() for job in jobs} == {"finished"}
    assert {job.origin for job in jobs} == {declared.priority}
    claims = {
        key.decode().rpartition(f"{declared.name}:")[2] for key in redis.scan_iter(f"periodic:run:{declared.name}:*")
    }
    assert claims == {run.isoformat() for run in run_times}


def _assert_view(client: TestClient, redis: Redis) -> None:
    listed = client.get("/jobs/periodic").json()
    views = {view["name"]: view for view in listed["jobs"]}
    assert listed["schedulers"] == 0 and set(views) == {"purge_expired", EVERY_SECOND.name, EVERY_TWO_SECONDS.name}
    for job in TEST_JOBS:
        view, newest = views[job.name], Job.fetch(get_cron_job_ids(job.name, redis, 0, 0)[0], connection=redis)
        assert (view["cron"], view["interval_seconds"], view["priority"]) == (job.cron, job.interval, job.priority)
        assert view["last_run"]["job_id"] == newest.id and view["last_run"]["status"] == "finished"
        assert view["last_run"]["run_at"] == newest.meta["run_at"].replace("+00:00", "Z")
        assert datetime.fromisoformat(view["next_run"]) > datetime.fromisoformat(newest.meta["run_at"])


def test_periodic_list_before_any_run(client: TestClient) -> None:
    before = datetime.now(UTC)
    listed = client.get("/jobs/periodic").json()
    assert listed["schedulers"] == 0
    (purge,) = [view for view in listed["jobs"] if view["name"] == "purge_expired"]
    next_run = datetime.fromisoformat(purge["next_run"])
    assert (purge["task"], purge["cron"], purge["args"], purge["last_run"]) == ("purge_expired", "15 3 * * *", {}, None)
    assert before < next_run <= before + timedelta(days=1)
    assert (next_run.astimezone().hour, next_run.astimezone().minute, next_run.second) == (3, 15, 0)


def _item(number: int, user_id: str, age: timedelta) -> Message:
    created = (datetime.now(UTC) - age).isoformat()
    return Message(f"d{number}", f"n{number}", user_id, f"Title {number}", "Body", created_at=created)


def test_purge_expired_removes_inbox_items_past_retention(
    client: TestClient, redis: Redis, processes: StartProcess
) -> None:
    settings = Settings()
    retention = timedelta(days=settings.inbox_retention_days)
    old, kept = retention + timedelta(hours=1), retention - timedelta(hours=1)
    for number, user_id, age in [(1, "gone", old), (2, "gone", old), (3, "mixed", old), (4, "mixed", old)]:
        in_app.send(settings, _item(number, user_id, age))
    for number, age in [(5, kept), (6, timedelta(0))]:
        in_app.send(settings, _item(number, "mixed", age))
    in_app.mark_read(redis, "mixed", "n3")
    processes("worker.py", wait_for_workers=1)
    answer = client.post("/jobs", json={"task": "purge_expired", "priority": "low"}).json()
    job = wait_until(lambda: (j := client.get(answer["status_url"]).json())["status"] == "finished" and j)
    assert job["result"] == {"inbox_items": 4, "inboxes": 2}
    total, items = in_app.list_items(redis, "mixed", 0, 10)
    assert (total, [item["id"] for item in items], in_app.unread_count(redis, "mixed")) == (2, ["n6", "n5"], 2)
    assert list(redis.scan_iter("inbox:{gone}:*")) == []
