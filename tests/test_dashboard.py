"""rq-dashboard at /rq: basic auth, no password -> not served, read-only mode, and a real headless Chromium."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import Job

from herald import mailsink
from herald.api.dashboard import mount_dashboard
from settings import Settings
from tests.helpers import stop_process

USER, PASSWORD = "admin", "s3cret-pass"

MakeDashboard = Callable[..., TestClient]


@pytest.fixture
def dashboard(monkeypatch: pytest.MonkeyPatch, redis: Redis) -> Iterator[MakeDashboard]:
    """`dashboard(password=..., read_only=...)`: a fresh FastAPI app with only the dashboard mounted."""
    clients: list[TestClient] = []

    def make(password: str = PASSWORD, read_only: bool = False) -> TestClient:
        monkeypatch.setenv("DASHBOARD_USERNAME", USER)
        monkeypatch.setenv("DASHBOARD_PASSWORD", password)
        monkeypatch.setenv("DASHBOARD_READ_ONLY", str(read_only).lower())
        app = FastAPI()
        mount_dashboard(app, Settings())
        clients.append(TestClient(app, raise_server_exceptions=False))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.mark.parametrize(
    ("path", "auth", "status"),
    [
        ("/rq", None, 401),
        ("/rq/", (USER, "wrong"), 401),
        ("/rq/", ("someone", PASSWORD), 401),
        ("/rq/static/js/jquery-3.5.1.min.js", None, 401),
        ("/rq/0/data/queues.json", None, 401),
        ("/rq", (USER, PASSWORD), 200),
        ("/rq/static/js/jquery-3.5.1.min.js", (USER, PASSWORD), 200),
    ],
)
def test_basic_auth_guards_every_path(
    dashboard: MakeDashboard, path: str, auth: tuple[str, str] | None, status: int
) -> None:
    response = dashboard().get(path, auth=auth)
    assert response.status_code == status
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Basic ")


def test_queues_json_lists_the_service_queues(dashboard: MakeDashboard, redis: Redis) -> None:
    Queue("high", connection=redis).enqueue("tests.fixtures.sleep", 0)
    response = dashboard().get("/rq/0/data/queues.json", auth=(USER, PASSWORD))
    assert [(q["name"], q["count"]) for q in response.json()["queues"]] == [("high", 1)]


def test_without_a_password_nothing_is_mounted(dashboard: MakeDashboard, caplog: pytest.LogCaptureFixture) -> None:
    client = dashboard(password="")
    assert client.get("/rq", auth=(USER, "")).status_code == 404
    assert client.get("/rq/", auth=(USER, "")).status_code == 404
    assert "DASHBOARD_PASSWORD" in caplog.text


def _write_actions(redis: Redis) -> list[tuple[str, str]]:
    failed = _failed_job(redis)
    return [
        ("POST", f"/rq/job/{failed.id}/delete"),
        ("POST", f"/rq/job/{failed.id}/requeue"),
        ("GET", "/rq/requeue/low"),
        ("POST", "/rq/requeue/low"),
        ("POST", "/rq/queue/high/queued/empty"),
        ("POST", "/rq/queue/low/failed/empty"),
        ("POST", "/rq/queue/high/compact"),
    ]


def test_read_only_refuses_destructive_actions(dashboard: MakeDashboard, redis: Redis) -> None:
    Queue("high", connection=redis).enqueue("tests.fixtures.sleep", 0)
    client = dashboard(read_only=True)
    for method, path in _write_actions(redis):
        assert client.request(method, path, auth=(USER, PASSWORD)).status_code == 403, (method, path)
    assert Queue("high", connection=redis).count == 1
    assert Queue("low", connection=redis).failed_job_registry.count == 1
    page = client.get("/rq/0/view/jobs/high/queued/8/asc/1", auth=(USER, PASSWORD))
    assert page.status_code == 200 and 'id="empty-btn"' not in page.text


def test_without_read_only_the_same_action_works(dashboard: MakeDashboard, redis: Redis) -> None:
    Queue("high", connection=redis).enqueue("tests.fixtures.sleep", 0)
    response = dashboard().post("/rq/queue/high/queued/empty", auth=(USER, PASSWORD))
    assert (response.status_code, response.json()) == (200, {"status": "OK"})
    assert Queue("high", connection=redis).count == 0


def test_redis_down_gives_503_not_a_crash(dashboard: MakeDashboard, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{mailsink.free_port()}/0")
    client = dashboard()
    assert client.get("/rq/0/data/queues.json", auth=(USER, PASSWORD)).status_code == 503
    assert client.get("/rq/", auth=(USER, PASSWORD)).status_code == 200  # rq-dashboard's own "Connection Error"


def test_unparsable_redis_url_leaves_the_dashboard_out(
    dashboard: MakeDashboard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "http://127.0.0.1/0")
    assert dashboard().get("/rq/", auth=(USER, PASSWORD)).status_code == 404


# --- A real browser on the real API -------------------------------------------------------------------------


def _failed_job(redis: Redis) -> Job:
    """A job that failed with PermanentError in queue `low`, run by an in-process worker."""
    job = Queue("low", connection=redis).enqueue("tests.fixtures.fail_permanently")
    SimpleWorker(["low"], connection=redis).work(burst=True)
    assert job.get_status() == "failed"
    return job


@pytest.fixture
def api_env() -> dict[str, str]:
    """`api_url`'s API with the dashboard password set."""
    return {"DASHBOARD_USERNAME": USER, "DASHBOARD_PASSWORD": PASSWORD, "DASHBOARD_READ_ONLY": "false"}


def _browse(chromium: str, url: str, screenshot: Path, profile: Path) -> str:
    """The DOM of `url` after its scripts ran (virtual time lets the dashboard's XHRs finish); a screenshot too."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    flags += ["--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
    flags += ["--virtual-time-budget=5000", "--window-size=1280,900", f"--screenshot={screenshot}", "--dump-dom"]
    process = subprocess.Popen(
        [chromium, *flags, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=60)
    finally:
        stop_process(process)  # Chromium's helpers (zygote, crashpad) share its process group
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class _QueueRows(HTMLParser):
    """The cells of each rendered `<tr data-role="queue">` of the dashboard's queue table."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._in_row = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self._in_row = ("data-role", "queue") in attrs
            if self._in_row:
                self.rows.append([])
        elif tag == "td" and self._in_row:
            self.rows[-1].append("")

    def handle_data(self, data: str) -> None:
        if self._in_row and self.rows[-1]:
            self.rows[-1][-1] += data.strip()


def _queue_counts(dom: str) -> dict[str, tuple[int, int]]:
    """{queue: (queued, failed)} as the browser shows them."""
    parser = _QueueRows()
    parser.feed(dom)
    return {row[0]: (int(row[1]), int(row[6])) for row in parser.rows}


def test_dashboard_in_headless_chromium(chromium: str, api_url: str, redis: Redis, tmp_path: Path) -> None:
    failed = _failed_job(redis)
    for name, count in (("high", 1), ("default", 2), ("low", 3)):
        for seconds in range(count):
            Queue(name, connection=redis).enqueue("tests.fixtures.sleep", seconds)
    base = api_url.replace("://", f"://{USER}:{PASSWORD}@") + "/rq"
    screenshots = tmp_path / "screenshots"  # pytest keeps the last few runs' under its base temp folder
    screenshots.mkdir()

    queues_dom = _browse(chromium, f"{base}/", screenshots / "dashboard-queues.png", tmp_path / "profile-1")
    assert _queue_counts(queues_dom) == {"high": (1, 0), "default": (2, 0), "low": (3, 1)}

    job_page = screenshots / "dashboard-failed-job.png"
    job_dom = _browse(chromium, f"{base}/0/view/job/{failed.id}", job_page, tmp_path / "profile-2")
    assert failed.id in job_dom
    assert "Traceback (most recent call last)" in job_dom
    assert "PermanentError: recipient rejected" in job_dom
    assert job_page.stat().st_size > 10_000
    print(f"screenshots: {screenshots / 'dashboard-queues.png'} {job_page}")
