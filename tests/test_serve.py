"""The run command (`serve.py`): the whole stack starts, a second copy refuses, Ctrl-C leaves nothing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from mailsink import free_port
from serve import port_is_free
from tests.helpers import ROOT, descendants, wait_for_http, wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """`serve.py` with an embedded Redis, sink and API on free ports; its output goes to a file."""
    ports = {"redis": free_port(), "api": free_port(), "mail": free_port()}
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0", "WORKER_COUNT": "2"}
    env.pop("SMTP_HOST", None)
    env.pop("DASHBOARD_PASSWORD", None)
    args = ["--port", str(ports["api"]), "--mail-port", str(ports["mail"]), "--var", str(tmp_path)]
    log = (tmp_path / "serve.log").open("w+")
    command = [sys.executable, "serve.py", *args]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield {"process": process, "ports": ports, "log": tmp_path / "serve.log", "command": command, "env": env}
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    log.close()


def test_run_command_serves_mail_refuses_a_second_copy_and_stops_cleanly(stack: dict[str, object]) -> None:
    ports, log = stack["ports"], stack["log"]
    assert isinstance(ports, dict) and isinstance(log, Path)
    api = f"http://127.0.0.1:{ports['api']}"

    wait_for_http(f"{api}/healthz")
    email = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}
    job = httpx.post(f"{api}/send-email", json=email).json()
    wait_until(lambda: "mail to ann@example.com: 'Hi'" in log.read_text(), timeout=20, what="the sink to print it")
    assert httpx.get(f"{api}{job['status_url']}").json()["status"] == "finished"
    banner = log.read_text()
    assert f"{api}/docs" in banner and f"{api}/rq" in banner and "(generated)" in banner

    second = subprocess.run(stack["command"], cwd=ROOT, env=stack["env"], capture_output=True, text=True, timeout=30)  # type: ignore[call-overload]
    assert second.returncode == 1 and f"port {ports['api']} is in use" in second.stderr

    pids = [int(pid) for pid in re.findall(r"started \(pid=(\d+)\)", log.read_text())]
    assert len(pids) == 4  # api, worker pool, scheduler, mail
    process = stack["process"]
    assert isinstance(process, subprocess.Popen)
    everything = descendants(process.pid)  # the pool's workers and uvicorn's processes too
    assert len(everything) > len(pids)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) in (0, 130, -2)
    assert [pid for pid in everything if _alive(pid)] == []
    assert all(port_is_free("127.0.0.1", port) for port in ports.values())
