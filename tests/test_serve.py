"""The run command (`serve.py`): the whole stack starts, a second copy refuses, and Ctrl-C, SIGTERM
or SIGHUP leave nothing running, Redis stopped last, whatever its standard output is."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx2 as httpx
import pytest

from herald.mailsink import free_port
from herald.serve import port_is_free
from tests.helpers import ROOT, descendants, wait_for_http, wait_until

STOP_DEADLINE_SECONDS = 10
"""The issue's promise: every process the run command started is gone within this time."""


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _started(pid: int) -> str | None:
    """When `pid` started (in clock ticks since boot): tells a process from a later one with its pid."""
    fields = _stat(pid)
    return fields[19] if fields else None


@dataclass
class Stack:
    """A `serve.py` in a session of its own, and every process seen below it (to clean up)."""

    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path
    command: list[str]
    env: dict[str, str]
    reader: subprocess.Popen[bytes] | None = None
    seen: dict[int, str | None] = field(default_factory=dict)

    def below(self) -> list[int]:
        found = descendants(self.process.pid)
        self.seen |= {pid: self.seen.get(pid) or _started(pid) for pid in found}
        return found

    def children(self) -> dict[str, int]:
        """The run command's processes by name, as it logged them when it started them."""
        return {name: int(pid) for name, pid in re.findall(r"(\w+) started \(pid=(\d+)\)", self.log.read_text())}

    def redis(self) -> int:
        return next(pid for pid in self.below() if "valkey" in Path(f"/proc/{pid}/cmdline").read_text())

    def kill_reader(self) -> None:
        """Kill what reads serve.py's output, as Ctrl-C kills the `tee` of `./run.sh | tee run.log`."""
        assert self.reader is not None
        self.reader.kill()
        self.reader.wait()

    def signal(self, signum: int) -> None:
        """`signum` to serve.py's process group, as a terminal sends Ctrl-C."""
        os.killpg(self.process.pid, signum)

    def serving(self) -> None:
        wait_for_http(f"http://127.0.0.1:{self.ports['api']}/healthz")
        wait_until(lambda: len(self.children()) == 4, what="api, worker, scheduler and mail to start")


def _output(kind: str, log: IO[bytes]) -> tuple[int, subprocess.Popen[bytes] | None]:
    """A descriptor for serve.py's stdout: the log file, or a pipe or a terminal that `cat` copies to it."""
    if kind == "file":
        return os.dup(log.fileno()), None
    theirs, ours = os.pipe()[::-1] if kind == "pipe" else os.openpty()[::-1]
    reader = subprocess.Popen(["cat"], stdin=ours, stdout=log)
    os.close(ours)
    return theirs, reader


def _kill_everything(stack: Stack) -> None:
    """SIGKILL serve.py and every process found below it, now or before (if it is still that process)."""
    pids = [stack.process.pid, *stack.below()] if stack.process.poll() is None else stack.below()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)  # nothing forks, reaps or respawns while they are listed
    pids += [pid for pid in [*stack.below(), *stack.seen] if _started(pid) == stack.seen.get(pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stack.process.wait()


@pytest.fixture
def start_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Start `serve.py` with an embedded Redis, sink and API on free ports, its stdout a `kind` of
    file; at the end, kill whatever of it is left."""
    started: list[Stack] = []
    log = (tmp_path / "serve.log").open("wb")

    def start(kind: str = "file", *extra: str) -> Stack:
        ports = {"redis": free_port(), "api": free_port(), "mail": free_port()}
        env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0", "WORKER_COUNT": "2"}
        env.pop("SMTP_HOST", None)
        env.pop("DASHBOARD_PASSWORD", None)
        args = ["--port", str(ports["api"]), "--mail-port", str(ports["mail"]), "--var", str(tmp_path), *extra]
        command = [sys.executable, "-m", "herald.serve", *args]
        stdout, reader = _output(kind, log)
        options = {"cwd": ROOT, "env": env, "stdout": stdout, "stderr": subprocess.STDOUT}
        process = subprocess.Popen(command, start_new_session=True, **options)  # type: ignore[call-overload]
        os.close(stdout)
        started.append(Stack(process, ports, tmp_path / "serve.log", command, env, reader))
        return started[-1]

    try:
        yield start
    finally:
        for stack in started:
            _kill_everything(stack)
            if stack.reader is not None:
                stack.kill_reader()
        log.close()


def _stops_everything_redis_last(stack: Stack, signum: int) -> None:
    """Send `signum`, wait (up to the issue's deadline) until every process below serve.py is gone;
    fail as soon as Redis is seen gone while another one still runs."""
    redis = stack.redis()
    others = [pid for pid in stack.below() if pid != redis]
    stack.signal(signum)

    def all_gone() -> bool:
        redis_alive = _alive(redis)  # looked at first: a process alive after this was alive when Redis died
        running = [pid for pid in others if _alive(pid)]
        assert redis_alive or not running, f"Redis stopped while {running} still ran"
        return not redis_alive and not running and all(port_is_free("127.0.0.1", port) for port in stack.ports.values())

    wait_until(all_gone, timeout=STOP_DEADLINE_SECONDS, interval=0.005, what="every process to stop, every port free")


def test_run_command_serves_mail_refuses_a_second_copy_and_stops_cleanly(start_stack: Callable[..., Stack]) -> None:
    stack = start_stack()
    api = f"http://127.0.0.1:{stack.ports['api']}"
    stack.serving()
    email = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}
    job = httpx.post(f"{api}/send-email", json=email).json()
    wait_until(
        lambda: "mail to ann@example.com: 'Hi'" in stack.log.read_text(), timeout=20, what="the sink to print it"
    )
    assert httpx.get(f"{api}{job['status_url']}").json()["status"] == "finished"
    banner = stack.log.read_text()
    assert f"{api}/docs" in banner and f"{api}/rq" in banner and "(generated)" in banner

    second = subprocess.run(stack.command, cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=30)
    assert second.returncode == 1 and f"port {stack.ports['api']} is in use" in second.stderr

    assert len(stack.below()) > len(stack.children())  # the pool's workers and uvicorn's processes too
    _stops_everything_redis_last(stack, signal.SIGINT)
    assert stack.process.wait(timeout=STOP_DEADLINE_SECONDS) == 130


@pytest.mark.parametrize(
    ("output", "signum", "hung"),
    [
        pytest.param("pipe", signal.SIGINT, False, id="ctrl-c, the pipe's reader killed with it"),
        pytest.param("pty", signal.SIGHUP, False, id="sighup, the terminal closed"),
        pytest.param("file", signal.SIGTERM, True, id="sigterm, the scheduler hung"),
    ],
)
def test_a_stop_signal_stops_every_process_redis_last(
    start_stack: Callable[..., Stack], output: str, signum: signal.Signals, hung: bool
) -> None:
    stack = start_stack(output)
    stack.serving()
    if stack.reader is not None:
        stack.kill_reader()
    if hung:
        os.kill(stack.children()["scheduler"], signal.SIGSTOP)  # SIGTERM cannot stop it: SIGKILL must
    _stops_everything_redis_last(stack, signum)
    assert stack.process.wait(timeout=STOP_DEADLINE_SECONDS) == 128 + signum


def test_a_second_ctrl_c_kills_what_is_left_at_once(start_stack: Callable[..., Stack]) -> None:
    stack = start_stack("pipe", "--grace", "600")
    stack.serving()
    scheduler = stack.children()["scheduler"]
    os.kill(scheduler, signal.SIGSTOP)  # it ignores the first Ctrl-C; the grace would wait for it
    held = {scheduler, *descendants(scheduler), stack.redis()}
    others = [pid for pid in stack.below() if pid not in held]
    stack.signal(signal.SIGINT)
    wait_until(lambda: not any(_alive(pid) for pid in others), timeout=STOP_DEADLINE_SECONDS, what="the others to stop")
    assert _alive(scheduler) and _alive(stack.redis())

    _stops_everything_redis_last(stack, signal.SIGINT)
    assert stack.process.wait(timeout=STOP_DEADLINE_SECONDS) == 130
