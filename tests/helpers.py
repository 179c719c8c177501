"""Waiting on conditions, and the processes the integration tests start."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_until(condition: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll `condition` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    """Wait until `url` answers 200 (a server started by a test is up)."""
    import httpx2

    def ok() -> bool:
        try:
            return httpx2.get(url, timeout=1).status_code == 200
        except httpx2.HTTPError:
            return False

    wait_until(ok, timeout, interval=0.1, what=f"{url} to answer")


def answers(url: str) -> bool:
    """Whether `url` answers 200 now (within a second)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


def start_process(
    *args: str, env: dict[str, str] | None = None, output: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """Start a project entry point (`worker.py`, `-m herald.serve`) or a command of the venv (`rq`) from the
    project folder; with `output`, its stdout and stderr go there."""
    python = args[0].endswith(".py") or args[0] == "-m"
    program = args[0] if python else str(Path(sys.executable).with_name(args[0]))
    command = [sys.executable, program, *args[1:]] if python else [program, *args[1:]]
    stderr = None if output is None else subprocess.STDOUT
    environment = {**os.environ, **(env or {})}
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=output, stderr=stderr, start_new_session=True)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group; SIGKILL whatever is left of it after `timeout`, and of its descendants.

    The descendants are noted first: a stock `rq worker`'s work-horse runs in a process group of its own, so
    killing the group misses it, and once the worker is gone it is no longer found as its child.
    """
    family = _identified(descendants(process.pid))
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGSTOP)  # no new children while the last ones are looked up
        family |= _identified(descendants(process.pid))
        os.killpg(process.pid, signal.SIGKILL)
    for pid, started in family.items():
        if start_time(pid) == started:  # the same process, not a new one given a freed pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    process.wait()


def _identified(pids: list[int]) -> dict[int, str]:
    """{pid: start time} of the processes still running."""
    return {pid: started for pid in pids if (started := start_time(pid))}


def start_time(pid: int) -> str:
    """When process `pid` started (field 22 of /proc/<pid>/stat), or "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""


def kill_worker(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a `worker.py` started by `start_process`: its pool, workers and any work-horse, as when
    its machine dies.

    The group is stopped first, so that no new horse is forked while the horse is looked up: RQ puts
    the horse in a process group of its own, which killing the worker's group would leave running.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGSTOP)
        stopped = descendants(process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    process.wait()


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, and theirs (Linux: /proc/<pid>/task/<tid>/children)."""
    children: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                children += [int(child) for child in (task / "children").read_text().split()]
    return children + [grandchild for child in children for grandchild in descendants(child)]


def refusing_port() -> socket.socket:
    """A loopback socket bound to a free port and never listening: connections to its port are refused
    for as long as it stays open, and nothing else can take the port meanwhile. Close it after use."""
    reserved = socket.socket()
    reserved.bind(("127.0.0.1", 0))
    return reserved
