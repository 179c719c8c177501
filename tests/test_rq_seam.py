"""The seam to RQ: the version check at start-up, and the check that keeps private names inside it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import rq.utils
from redis import Redis
from rq import Queue, SimpleWorker, Worker
from rq.job import JobStatus

from herald import rq_seam
from herald.jobs import store  # noqa: F401  # installs `dates.utcparse`
from herald.rq_seam.recovery import RecoveringSimpleWorker, RecoveringWorker
from tests import fixtures
from tests.helpers import ROOT


def test_supported_versions_pass_and_others_are_named() -> None:
    assert rq_seam.problems({"rq": "3.0.0", "rq-scheduler": "0.14.0"}) == []
    found = rq_seam.problems({"rq": "3.1.0", "rq-scheduler": "0.13.1"})
    assert len(found) == 2
    assert found[0].startswith("rq 3.1.0 is installed") and "rq>=3.0.0,<3.1" in found[0]
    assert found[1].startswith("rq-scheduler 0.13.1 is installed") and "rq-scheduler>=0.14.0,<0.15" in found[1]
    assert rq_seam.problems({"rq": "3.0.2"}) == [
        "rq-scheduler is not installed; herald needs rq-scheduler>=0.14.0,<0.15"
    ]
    with pytest.raises(rq_seam.UnsupportedVersionError, match=r"rq 3\.1\.0rc1 is installed"):
        rq_seam.check_versions({"rq": "3.1.0rc1", "rq-scheduler": "0.14.0"})


@pytest.mark.parametrize(
    "command",
    [("worker.py", "--burst"), ("scheduler.py",), ("-c", "import app"), ("-m", "rq.cli", "worker", "-c", "rqconfig")],
    ids=["worker.py", "scheduler.py", "app", "stock-rq-worker"],
)
def test_every_process_refuses_to_start_under_an_rq_it_was_not_written_for(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A distribution `rq 3.1.0` found first on the path (its metadata only): each entry point stops at
    once with the reason, before it touches Redis."""
    info = tmp_path / "rq-3.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rq\nVersion: 3.1.0\n")
    (info / "RECORD").write_text("")
    env = {"PYTHONPATH": str(tmp_path), "REDIS_URL": "redis://127.0.0.1:1/0", "PATH": ""}
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode != 0
    assert b"UnsupportedVersionError: rq 3.1.0 is installed" in done.stderr


def test_no_private_name_of_rq_or_redis_outside_the_seam() -> None:
    done = subprocess.run([sys.executable, "scripts/check_private_names.py"], cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_the_private_name_check_finds_each_kind_of_use(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from rq.job import Job\nfrom rq.utils import _private\nfrom rq import Worker\n\n"
        "class Mine(Worker):\n    pass\n\n"
        "def f(job: Job, pipeline: object) -> object:\n"
        "    job._status = 'x'\n"
        "    getattr(job, '__rq_redis_server_version', None)\n"
        "    return pipeline.command_stack\n"
    )
    done = subprocess.run(
        [sys.executable, "scripts/check_private_names.py", str(bad)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 1
    for finding in ("_private", "Mine", "_status", "__rq_redis_server_version", "command_stack"):
        assert finding in done.stdout, finding


@pytest.mark.parametrize(
    "text",
    [
        "2026-12-02T05:03:51.123456Z",  # what RQ writes
        "2026-12-02T05:03:51Z",  # older jobs
        "2026-12-02T05:03:51.1234Z",
        "2026-12-02 05:03:51Z",
        "2026-13-02T05:03:51Z",
        "2026-12-02T05:03:51.123456+02:00",
        "20261202T050351.1234567Z",
        "2026-12-02",
        "",
    ],
)
def test_rqs_timestamps_read_as_rq_reads_them(text: str) -> None:
    """`dates.utcparse` replaces RQ's: the same datetime, or the same refusal, for every string."""
    from herald.rq_seam import dates

    def parsed(parse: Callable[[str], datetime]) -> datetime | str:
        try:
            return parse(text)
        except ValueError:
            return "refused"

    assert parsed(dates.utcparse) == parsed(dates.RQ_UTCPARSE)
    assert rq.utils.utcparse is dates.utcparse, "installed by the worker classes' and the job store's modules"


def test_rqs_own_timestamps_round_trip() -> None:
    from herald.rq_seam import dates

    moment = rq.utils.now()
    assert dates.utcparse(rq.utils.utcformat(moment)) == moment


def _ended_hash(redis: Redis, worker_class: type[Worker], func: Callable[..., object]) -> dict[bytes, bytes]:
    job = Queue("default", connection=redis).enqueue(func, result_ttl=600)
    worker_class(["default"], connection=redis).work(burst=True)
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    ended: dict[bytes, bytes] = redis.hgetall(job.key)  # type: ignore[assignment]
    return {name: value for name, value in ended.items() if name not in RUN_SPECIFIC}


RUN_SPECIFIC = {b"created_at", b"enqueued_at", b"started_at", b"ended_at", b"last_heartbeat", b"worker_name"}
"""Fields whose values differ between any two runs."""


@pytest.mark.parametrize("func", [fixtures.pid, fixtures.delete_own_job], ids=["kept", "deleted while it ran"])
@pytest.mark.parametrize(
    ("ours_class", "theirs_class"),
    [(RecoveringSimpleWorker, SimpleWorker), (RecoveringWorker, Worker)],
    ids=["in process", "forking"],
)
def test_a_finished_jobs_hash_is_as_rqs_own_worker_leaves_it(
    redis: Redis, func: Callable[..., object], ours_class: type[Worker], theirs_class: type[Worker]
) -> None:
    """Our end writes only the fields a run changed (the whole hash again when it was deleted while the job
    ran); the hash left is RQ's: the same fields, and the same values where they are not the run's own."""
    theirs = _ended_hash(redis, theirs_class, func)
    ours = _ended_hash(redis, ours_class, func)
    assert ours == theirs and b"description" in ours and ours[b"status"] == b"finished"
