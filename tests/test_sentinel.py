"""Every process through Sentinel (`REDIS_URL=redis+sentinel://...`), and a failover under it.

A real primary, two replicas and three sentinels (valkey-server, loopback, free ports); the API
(uvicorn), `worker.py` and RQ's stock CLI as processes of their own.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

import rqconfig
from herald import mailsink
from herald.infra import connections
from herald.jobs import enqueue, store
from settings import Settings
from tests.conftest import StartProcess
from tests.helpers import ROOT, stop_process, wait_for_http, wait_until
from tests.replication import MASTER_NAME, ReplicaSet

EMAIL = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}
PASSWORD = "dashboard-secret"


@pytest.fixture
def replica_set() -> Iterator[ReplicaSet]:
    with tempfile.TemporaryDirectory(prefix="test-sentinel-") as folder:
        ports = [mailsink.free_port() for _ in range(6)]
        nodes = ReplicaSet(Path(folder), "127.0.0.1", ports)
        try:
            yield nodes.start()
        finally:
            nodes.stop()


@pytest.fixture
def sentinel_env(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], smtp: mailsink.MailSink, replica_set: ReplicaSet
) -> Iterator[dict[str, str]]:
    """The environment of this test's processes: REDIS_URL through the sentinels, a dashboard password.

    The `env` dict keeps the session's plain server, which the `redis` fixture (of `processes`) empties.
    """
    for name, value in {"REDIS_URL": replica_set.url, "DASHBOARD_PASSWORD": PASSWORD}.items():
        monkeypatch.setenv(name, value)
    yield env


def test_the_sentinel_url_is_read_as_rq_dashboard_reads_it() -> None:
    parsed = connections.parse_sentinel_url("redis+sentinel://:s%40cret@h1:26379,h2,[::1]:26380/jobs/3")
    assert parsed == connections.SentinelUrl((("h1", 26379), ("h2", 26379), ("::1", 26380)), "jobs", 3, "s@cret")
    assert connections.parse_sentinel_url("redis://localhost:6379/0") is None
    with pytest.raises(ValueError, match="master name"):
        connections.parse_sentinel_url("redis+sentinel://h1:26379")


def test_rq_cli_config_is_a_sentinel_dict_for_a_sentinel_url() -> None:
    settings = Settings(redis_url="redis+sentinel://h1:1,h2:2/jobs/1", redis_sentinel_password="pw")
    config = rqconfig.sentinel_config(settings)
    assert config is not None
    assert (config["INSTANCES"], config["MASTER_NAME"], config["DB"]) == ([("h1", 1), ("h2", 2)], "jobs", 1)
    assert config["SENTINEL_KWARGS"]["password"] == "pw"
    assert rqconfig.sentinel_config(Settings(redis_url="redis://localhost:6379/0")) is None


def api(processes: StartProcess) -> str:
    port = mailsink.free_port()
    processes("uvicorn", "app:app", "--port", str(port), "--no-access-log")
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz")
    return url


def finished(url: str, job_id: str) -> bool:
    try:
        return bool(httpx2.get(f"{url}/job/{job_id}", timeout=2).json().get("status") == "finished")
    except (httpx2.HTTPError, ValueError):
        return False


def rq_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("rq")), args[0], "-c", "rqconfig", *args[1:]]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture
def worker_log(sentinel_env: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    """A `worker.py` whose output goes to the file yielded."""
    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "worker.py"], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield log
    finally:
        stop_process(worker)


def test_every_process_finds_the_primary_through_sentinel_and_follows_a_failover(
    sentinel_env: dict[str, str], replica_set: ReplicaSet, processes: StartProcess, worker_log: Path
) -> None:
    url = api(processes)
    first = httpx2.post(f"{url}/send-email", json=EMAIL, timeout=5)
    assert first.status_code == 202, first.text
    wait_until(lambda: finished(url, first.json()["job_id"]), timeout=30, what="the worker to send the email")
    info = rq_cli("info", "--only-workers")
    assert info.returncode == 0 and "1 workers" in info.stdout, info.stdout + info.stderr
    dashboard = httpx2.get(f"{url}/rq/0/data/workers.json", auth=("admin", PASSWORD), timeout=5)
    assert dashboard.status_code == 200 and len(dashboard.json()["workers"]) == 1, dashboard.text
    assert httpx2.get(f"{url}/metrics", timeout=5).status_code == 200

    for replica in replica_set.nodes[1:]:  # the next primary lacks keyspace events: its workers must poll
        replica_set.client(replica).config_set("notify-keyspace-events", "")
    old = replica_set.kill_primary()
    answers: list[httpx2.Response] = []

    def accepted() -> httpx2.Response | None:
        answers.append(httpx2.post(f"{url}/jobs", json={"task": "noop"}, timeout=10))
        return answers[-1] if answers[-1].status_code == 202 else None

    again = wait_until(accepted, timeout=60, interval=0.05, what="the API to accept jobs after the failover")
    refused = [answer for answer in answers if answer.status_code != 202]
    assert refused, "the API accepted jobs while the primary was down"
    assert {answer.status_code for answer in refused} == {503}
    assert all("detail" in answer.json() for answer in refused)
    assert replica_set.primary().port != old.port
    wait_until(lambda: finished(url, again.json()["job_id"]), timeout=30, what="the worker to follow the primary")
    assert "Redis notify-keyspace-events is ''" in worker_log.read_text()  # the warning of the polling fallback
    assert MASTER_NAME in replica_set.url


def test_the_stock_rq_worker_runs_jobs_through_sentinel_with_rqconfig(sentinel_env: dict[str, str]) -> None:
    settings = Settings()
    job = enqueue.enqueue_task(settings, "noop", {}, "low")
    run = rq_cli("worker", "--burst", "high", "default", "low")
    assert run.returncode == 0, run.stdout + run.stderr
    assert store.fetch_job(settings, job.id).get_status().value == "finished"
