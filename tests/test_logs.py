"""Logs: JSON lines or console lines with the job's context, from real worker and API processes, never a secret."""

from __future__ import annotations

import base64
import importlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import rq.logutils
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError
from redis import Redis
from rq import Queue, SimpleWorker
from rq.group import Group
from rq.job import Job

from herald import serve
from herald.infra import metrics
from herald.infra.logs import REDACTED, LogFormat, log_format_for, secret_values, setup_logging
from herald.jobs import queues
from herald.mailsink import MailSink, free_port
from settings import Settings
from tests.helpers import ROOT, stop_process, wait_for_http, wait_until
from tests.receiver import Receiver

WEBHOOK_KEY = base64.b64encode(b"webhook-key-Jm4Kp9").decode()
SECRETS = {
    "SMTP_PASSWORD": "smtp-pw-Qx7Zr2",
    "WEBHOOK_SECRET": f"whsec_{WEBHOOK_KEY}",
    "API_KEYS": "api-key-Vb8Nw3,api-key-Tc5Hy6",
    "DASHBOARD_PASSWORD": "dash-pw-Lf2Gs8",
    "UNSUBSCRIBE_SECRET": "unsub-secret-Pk4Dm9",
}
SECRET_VALUES = [*SECRETS.values(), WEBHOOK_KEY, "api-key-Vb8Nw3", "api-key-Tc5Hy6"]
REQUIRED = {"ts", "level", "logger", "message"}
CONSOLE_LINE = re.compile(
    r"(?P<time>\d\d:\d\d:\d\d\.\d{3}) (?P<level>[A-Z]+) +(?P<pid>\d+) (?P<logger>\S+): (?P<text>.*)"
)
"""Time, level, process id, logger, then the message and the known fields as `key=value`."""
LOG_CONFIG = ["--log-config", "uvicorn_logging.json"]


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Iterator[None]:
    """The secrets in this process's settings and in those of the processes it starts."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    yield


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the process's logging back as it was after a test that sets it up."""
    root, rq_worker = logging.getLogger(), logging.getLogger("rq.worker")
    handlers, level, filters = list(root.handlers), root.level, list(rq_worker.filters)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    rq_worker.filters[:] = filters


def assert_no_secret(text: str) -> None:
    leaked = [secret for secret in SECRET_VALUES if secret in text]
    assert not leaked, f"secrets leaked: {leaked}"


def wait_job(client: TestClient, job_id: str, status: str) -> None:
    wait_until(lambda: client.get(f"/job/{job_id}").json()["status"] == status, 20, what=f"job to be {status}")


def parse_lines(output: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert entries and all(entry.keys() >= REQUIRED for entry in entries)
    return entries


def records(output: str, log_format: str) -> list[tuple[str, str, str]]:
    """`(level, logger, text)` of every line, which must all be in `log_format` (no tracebacks expected)."""
    lines = output.splitlines()
    assert lines, "no log lines"
    if log_format == "json":
        return [(entry["level"], entry["logger"], entry["message"]) for entry in parse_lines(output)]
    matches = [CONSOLE_LINE.fullmatch(line) for line in lines]
    assert all(matches), [line for line, match in zip(lines, matches, strict=True) if not match]
    return [(match["level"], match["logger"], match["text"]) for match in matches if match]


def console_entries(output: str) -> list[tuple[re.Match[str], str]]:
    """Each console record: its first line, and the lines that follow it (a traceback)."""
    entries: list[tuple[re.Match[str], str]] = []
    for line in output.splitlines():
        if match := CONSOLE_LINE.fullmatch(line):
            entries.append((match, ""))
        elif entries:
            entries[-1] = (entries[-1][0], f"{entries[-1][1]}{line}\n")
    return entries


def count(found: list[tuple[str, str, str]], logger: str, text: str) -> int:
    return sum(1 for _, name, line in found if name == logger and text in line)


def log_secrets(log_format: LogFormat, level: int, extra: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    """What `setup_logging` writes, in `log_format`, of a line below its level, a line at `level` with a
    secret in its message and `extra`, and an exception whose message holds secrets; checked to hold none."""
    setup_logging("INFO", log_format, secret_values(Settings()))
    log = logging.getLogger("test")
    log.debug("below the level: not written")
    log.log(level, "login with %s", SECRETS["SMTP_PASSWORD"], extra=extra)
    try:
        raise ValueError(f"bad key {WEBHOOK_KEY} for {SECRETS['DASHBOARD_PASSWORD']}")
    except ValueError:
        log.exception("failed with api-key-Tc5Hy6")
    output = capsys.readouterr().err
    assert_no_secret(output)
    return output


def test_log_lines_are_json_with_secrets_redacted(
    secrets: None, root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = {"delivery_id": "d1", "error": SECRETS["API_KEYS"]}
    first, second = parse_lines(log_secrets("json", logging.INFO, extra, capsys))
    assert (first["level"], first["logger"], first["delivery_id"]) == ("INFO", "test", "d1")
    assert first["message"] == f"login with {REDACTED}" and first["error"] == f"{REDACTED},{REDACTED}"
    assert second["level"] == "ERROR" and second["message"] == f"failed with {REDACTED}"
    assert f"ValueError: bad key {REDACTED} for {REDACTED}" in second["exc_info"]


def test_the_single_api_key_is_redacted_too(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("API_KEY", "solo-key-Wd3Pn8")
    setup_logging("INFO", secrets=secret_values(Settings()))
    logging.getLogger("test").warning("refused solo-key-Wd3Pn8")
    [entry] = parse_lines(capsys.readouterr().err)
    assert entry["message"] == f"refused {REDACTED}"


def test_console_lines_show_time_level_process_message_and_fields_with_secrets_redacted(
    secrets: None, root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = {"delivery_id": "d1", "error": f"PermanentError: {SECRETS['API_KEYS']}", "attempt": 2}
    first, second, *traceback_lines = log_secrets("console", logging.WARNING, extra, capsys).splitlines()
    header = CONSOLE_LINE.fullmatch(first)
    assert header and (header["level"], header["pid"], header["logger"]) == ("WARNING", str(os.getpid()), "test")
    assert (
        header["text"]
        == f'login with {REDACTED} attempt=2 delivery_id=d1 error="PermanentError: {REDACTED},{REDACTED}"'
    )
    header = CONSOLE_LINE.fullmatch(second)
    assert header and (header["level"], header["text"]) == ("ERROR", f"failed with {REDACTED}")
    assert traceback_lines[0] == "Traceback (most recent call last):"
    assert traceback_lines[-1] == f"ValueError: bad key {REDACTED} for {REDACTED}"


def test_json_messages_are_plain_text_when_rq_colours_them(
    root_logging: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(rq.logutils.colorizer, "notty", False)  # as when stdout is a terminal
    setup_logging("INFO", secrets=secret_values(Settings()))
    logging.getLogger("rq.worker").info("*** Listening on %s...", rq.logutils.green("high, default"))
    [entry] = parse_lines(capsys.readouterr().err)
    assert entry["message"] == "*** Listening on high, default..."


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("log_format", "environment", "terminal", "expected"),
    [
        ("", "local", False, "console"),  # ./run.sh: honcho pipes the output, but it is for a person
        ("", "production", True, "console"),
        ("", "production", False, "json"),  # containers, CI, production
        ("auto", "production", False, "json"),
        ("JSON", "local", True, "json"),  # set explicitly: it wins
        ("console", "production", False, "console"),
    ],
)
def test_log_format_is_console_for_people_and_json_for_machines(
    secrets: None, monkeypatch: pytest.MonkeyPatch, log_format: str, environment: str, terminal: bool, expected: str
) -> None:
    monkeypatch.setenv("LOG_FORMAT", log_format)
    monkeypatch.setenv("ENVIRONMENT", environment)
    monkeypatch.setattr(sys, "stderr", Terminal() if terminal else io.StringIO())
    assert log_format_for(Settings()) == expected


def test_an_unknown_log_format_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_FORMAT", "xml")
    with pytest.raises(ValidationError, match="log_format"):
        Settings()


def test_rq_maintenance_passes_are_logged_at_debug(
    redis: Redis, root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """RQ's own worker code, on the test Redis: its registry cleaning says so at DEBUG only."""
    rq_worker = SimpleWorker(["default"], connection=redis)  # RQ's own clean_registries, not recovery's
    for level in ("INFO", "DEBUG"):
        redis.flushdb()  # the maintenance locks
        setup_logging(level)
        rq_worker.clean_registries()
        rq_worker.clean_group_registries()
        rq_worker.log.info("Worker %s: other news", rq_worker.name)
        found = records(capsys.readouterr().err, "json")
        cleaning = [entry for entry in found if "cleaning" in entry[2]]
        assert count(found, "rq.worker", "other news") == 1, level
        if level == "INFO":
            assert cleaning == []
        else:
            assert [(entry[0], entry[2].split(": ", 1)[1]) for entry in cleaning] == [
                ("DEBUG", "cleaning registries for queue: default"),
                ("DEBUG", "cleaning group registries"),
            ]


class Started:
    """Commands started from the project folder; each one's stdout and stderr go to two files."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.running = folder, list[subprocess.Popen[bytes]]()

    def __call__(self, command: list[str], **env: str) -> tuple[Path, Path]:
        out, err = self.folder / f"{len(self.running)}.out", self.folder / f"{len(self.running)}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            self.running.append(
                subprocess.Popen(
                    command, cwd=ROOT, env={**os.environ, **env}, stdout=stdout, stderr=stderr, start_new_session=True
                )
            )
        return out, err

    def stop(self) -> None:
        for process in self.running:
            stop_process(process)


@pytest.fixture
def started(redis: Redis, tmp_path: Path) -> Iterator[Started]:
    processes = Started(tmp_path)
    yield processes
    processes.stop()


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_worker_lines_rq_own_too_come_once_in_the_format(started: Started, redis: Redis, log_format: str) -> None:
    out, err = started([sys.executable, "worker.py"], LOG_FORMAT=log_format)
    wait_until(lambda: metrics.alive_workers(redis), what="worker to register")
    default = Queue("default", connection=redis)
    job = default.enqueue_job(
        default.create_job(importlib.import_module, args=("json",), **queues.job_options(Settings(), None))
    )
    wait_until(lambda: Job.fetch(job.id, connection=redis).get_status() == "finished", 20, what="job to finish")
    assert redis.exists(Group.REDIS_GROUP_CLEANING_KEY), "the worker's first maintenance pass (before its job) ran"
    started.stop()  # its shutdown lines too
    assert out.read_text() == ""  # RQ's own handlers write to stdout: none was added
    found = records(err.read_text(), log_format)
    assert count(found, "rq.worker", "started with PID") == 1
    assert count(found, "rq.worker", f"Job OK ({job.id})") == 1
    assert count(found, "worker", "ended with status 2: exit") == 1  # the supervisor's (WORKER_COUNT=1)
    assert count(found, "rq.scheduler", "started with PID") == 1
    assert not [line for line in found if "cleaning" in line[2]]  # at INFO


def test_worker_at_debug_shows_its_maintenance_passes(started: Started, redis: Redis) -> None:
    _, err = started([sys.executable, "worker.py"], LOG_FORMAT="console", LOG_LEVEL="DEBUG")
    line = re.compile(r".* DEBUG +\d+ rq\.worker: Worker \w+: cleaning group registries")
    wait_until(lambda: any(line.fullmatch(text) for text in err.read_text().splitlines()), what="a maintenance line")


def test_every_api_command_logs_through_our_handler() -> None:
    """uvicorn's supervisor (`--workers`) imports no app: only `--log-config` sends its lines through ours."""
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    commands = [json.loads(next(line for line in dockerfile if line.startswith("CMD "))[4:])]
    commands.append(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]["command"])
    commands.append(shlex.split(serve.processes(Settings(), serve.Options())["api"]))
    for command in commands:
        assert " ".join(LOG_CONFIG) in " ".join(command), command


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_api_lines_uvicorn_own_too_come_once_in_the_format(
    started: Started, redis: Redis, monkeypatch: pytest.MonkeyPatch, log_format: str
) -> None:
    """The run command's API line (two uvicorn worker processes), with the access log on."""
    monkeypatch.setenv("API_WORKERS", "2")
    options = serve.Options()
    options.port = free_port()
    command = shlex.split(serve.processes(Settings(), options)["api"].removeprefix("exec "))
    command.remove("--no-access-log")
    out, err = started(command, LOG_FORMAT=log_format)
    url = f"http://127.0.0.1:{options.port}"
    wait_for_http(f"{url}/healthz")
    assert httpx2.get(f"{url}/nowhere", timeout=5).status_code == 404
    wait_until(lambda: "GET /nowhere" in err.read_text(), what="the access line")
    started.stop()
    assert out.read_text() == ""  # uvicorn's own access handler writes to stdout: it is gone
    found = records(err.read_text(), log_format)
    assert count(found, "uvicorn.error", "Uvicorn running on") == 1  # the supervisor's lines
    assert count(found, "uvicorn.error", "Started parent process") == 1
    assert count(found, "uvicorn.error", "Stopping parent process") == 1
    assert count(found, "uvicorn.error", "Started server process") == 2  # each worker process's
    assert count(found, "uvicorn.error", "Application startup complete") == 2
    assert count(found, "uvicorn.access", '"GET /nowhere HTTP/1.1" 404') == 1


@pytest.fixture
def log_format() -> str:
    return "json"


@pytest.fixture
def worker_output(secrets: None, redis: Redis, smtp: MailSink, webhooks: Receiver, log_format: str) -> Iterator[Path]:
    """A project worker with the secrets set, logging in `log_format`; its stdout and stderr go to the file yielded."""
    with tempfile.TemporaryDirectory(prefix="worker-logs-") as folder:
        path = Path(folder) / "worker.log"
        with path.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "worker.py"], cwd=ROOT, env={**os.environ, "LOG_FORMAT": log_format}, stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            wait_until(lambda: metrics.alive_workers(redis), what="worker to register")
            yield path
        finally:
            stop_process(process)


def deliver_every_outcome(
    client: TestClient, smtp: MailSink, webhooks: Receiver, redis: Redis
) -> tuple[dict[str, str], str]:
    """Deliveries retried, delivered and failed, and a job failing with a secret in its error; waits for them all.

    Returns the notification's delivery ids by channel, and the failing job's id.
    """
    client.headers["X-API-Key"] = "api-key-Tc5Hy6"
    smtp.fail_next(1, "451 4.3.0 Mailbox busy")  # email: retrying, then delivered
    webhooks.fail_next(1, 410)  # webhook: failed for good
    note = {"user_id": "u42", "title": "Hi", "body": "Welcome", "channels": ["email", "webhook", "in_app"]}
    note |= {"email": "ann@example.com", "webhook_url": f"{webhooks.url}/hooks"}
    response = client.post("/notifications", json=note, headers={"X-Request-ID": "req-logs-1"})
    assert response.status_code == 202, response.text
    deliveries = {d["channel"]: d["delivery_id"] for d in response.json()["deliveries"]}
    wait_job(client, deliveries["email"], "finished")  # before the next email: the one failure is for this one
    email_job = client.post("/send-email", json={"to": "bob@example.com", "subject": "Hi", "body": "Welcome"})
    # A job whose error message holds a secret: RQ logs its traceback from the work-horse.
    low = Queue("low", connection=redis)
    leaky = low.enqueue_job(
        low.create_job(
            importlib.import_module, args=(SECRETS["SMTP_PASSWORD"],), **queues.job_options(Settings(), None)
        )
    )
    expected = {deliveries["email"]: "finished", deliveries["webhook"]: "failed", deliveries["in_app"]: "finished"}
    expected |= {email_job.json()["job_id"]: "finished", leaky.id: "failed"}
    for job_id, status in expected.items():
        wait_job(client, job_id, status)

    answers = [client.get(f"/job/{job_id}").text for job_id in expected if job_id != leaky.id]
    answers += [client.get(f"/notifications/{response.json()['notification_id']}").text, client.get("/metrics").text]
    assert_no_secret("\n".join(answers))
    return deliveries, leaky.id


OUTCOMES = {("email", "retrying"), ("email", "delivered"), ("webhook", "failed"), ("in_app", "delivered")}


def assert_json_outcomes(output: str, deliveries: dict[str, str], leaky_id: str) -> None:
    """Each delivery outcome once, as a JSON line with the job's context; the leaky job's line redacted."""
    entries = parse_lines(output)
    assert any(REDACTED in entry["message"] and entry.get("job_id") == leaky_id for entry in entries)
    outcomes = {(e["channel"], e["outcome"]): e for e in entries if e.get("logger") == "tasks" and "outcome" in e}
    assert set(outcomes) == OUTCOMES
    for (channel, outcome), entry in outcomes.items():
        assert entry["delivery_id"] == entry["job_id"] == deliveries[channel]
        assert (entry["correlation_id"], entry["task"], entry["queue"]) == (
            "req-logs-1",
            f"deliver_{channel}",
            "default",
        )
        assert entry["attempt"] == (2 if (channel, outcome) == ("email", "delivered") else 1)
        assert entry["level"] == {"retrying": "WARNING", "failed": "ERROR"}.get(outcome, "INFO")
    assert outcomes[("webhook", "failed")]["error"].startswith("PermanentError: ")


def assert_console_outcomes(output: str, deliveries: dict[str, str], leaky_id: str) -> None:
    """Each delivery outcome once, as a console line with its fields; the leaky job's traceback redacted."""
    entries = console_entries(output)
    header = f"job {leaky_id}: exception raised"
    failed = [rest for line, rest in entries if header in line["text"] and f" job_id={leaky_id}" in line["text"]]
    assert len(failed) == 1 and f"ModuleNotFoundError: No module named '{REDACTED}'" in failed[0]
    lines = [line for line, _ in entries]
    for channel, outcome in OUTCOMES:
        fields = f"delivery_id={deliveries[channel]} correlation_id=req-logs-1 channel={channel} outcome={outcome}"
        assert [line["logger"] for line in lines if fields in line["text"]] == ["tasks"], (channel, outcome)


ASSERT_OUTCOMES = {"json": assert_json_outcomes, "console": assert_console_outcomes}


@pytest.mark.parametrize("log_format", list(ASSERT_OUTCOMES))
def test_worker_logs_each_delivery_outcome_without_secrets(
    log_format: str, worker_output: Path, client: TestClient, smtp: MailSink, webhooks: Receiver, redis: Redis
) -> None:
    deliveries, leaky_id = deliver_every_outcome(client, smtp, webhooks, redis)
    output = worker_output.read_text()
    assert_no_secret(output)
    ASSERT_OUTCOMES[log_format](output, deliveries, leaky_id)
