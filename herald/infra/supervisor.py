"""The process that keeps one worker process running: what `worker.py` becomes with WORKER_COUNT=1.

RQ's `WorkerPool` watches its workers from a process that has imported all they run (rq, redis-py, the
tasks): forked, a worker writes to most of those pages (Python's reference counts), and both copies stay
resident. With one worker, `worker.py` forks it and then replaces itself (exec) with this script, which
loads only the standard library's os, signal, sys, time, json and contextlib: the worker's pages are its own alone.

It does for its worker what RQ's pool does for each of its own: a stop (SIGTERM, SIGINT) is passed on as
SIGINT (a second one too: RQ's cold shutdown), then it waits for the worker and exits 0. A worker that ends
otherwise is replaced by a fresh process (`worker.py --one-process`): at once when it was recycled (its
share of jobs or memory), after `RESTART_PAUSE_SECONDS` when it died or quit. With `--burst`, the rules of
`herald.rq_seam.pool.Pool`: a recycled or crashed worker is replaced until one finds the queues empty;
the exit status is 0 only if none crashed, quit for want of Redis, or was stopped.

Run only by `worker.py`, as a script: ``python -I -S supervisor.py PID BURST LOG_FORMAT LOG_LEVEL COMMAND...``
(the worker's pid, 1 or 0, json or console, a level name, how to start a fresh worker). It imports nothing
of the project: importing `herald` would import RQ.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from enum import Enum, IntEnum

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
RESTART_PAUSE_SECONDS = 1.0
"""Before a crashed worker is replaced: RQ's pool looks at its processes once a second."""
LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


class Ending(IntEnum):
    """How a worker process ended: its exit status, by which a burst knows whether to replace it."""

    DRAINED = 0
    """It found the queues empty (burst)."""
    UNAVAILABLE = 1
    """Redis did not answer, or the worker quit on an error: the queues could not be drained."""
    STOPPED = 2
    """SIGTERM or SIGINT."""
    RECYCLED = 3
    """It ran its share of jobs or memory; a fresh process takes its place."""


class Step(Enum):
    """What the supervisor does once its worker has ended."""

    EXIT = "exit"
    START = "start a fresh worker"
    START_AFTER_PAUSE = "start a fresh worker after a pause"
    START_UNFINISHED = "start a fresh worker; the burst will exit 1"
    FAIL = "exit 1"


def next_step(status: int, burst: bool, stopping: bool) -> Step:
    """After the worker ended with exit `status` (negative: killed by that signal)."""
    if stopping:
        return Step.FAIL if burst else Step.EXIT
    if status == Ending.RECYCLED:
        return Step.START
    if not burst:
        return Step.START_AFTER_PAUSE
    if status == Ending.DRAINED:
        return Step.EXIT
    if status in (Ending.UNAVAILABLE, Ending.STOPPED):
        return Step.FAIL
    return Step.START_UNFINISHED


class Supervisor:
    def __init__(self, pid: int, burst: bool, command: list[str], log: Log) -> None:
        self.pid, self.burst, self.command, self.log = pid, burst, command, log
        self.stopping = False
        self.unfinished = False

    def run(self) -> int:
        """Supervise until the end; the exit status."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._pass_on)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # `worker.py` blocked them across the exec
        while True:
            status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            step = next_step(status, self.burst, self.stopping)
            self._report(status, step)
            if step in (Step.EXIT, Step.FAIL):
                return 1 if step is Step.FAIL or self.unfinished else 0
            self.unfinished |= step is Step.START_UNFINISHED
            if step is Step.START_AFTER_PAUSE:
                self._pause()
            if self.stopping:
                return 1 if self.burst else 0
            self._start()

    def _pass_on(self, signum: int, frame: object) -> None:
        self.stopping = True
        self.log("INFO", f"passing signal {signal.Signals(signum).name} on to worker process {self.pid}")
        with contextlib.suppress(ProcessLookupError):  # it has ended, and is being replaced: the loop sees `stopping`
            os.kill(self.pid, signal.SIGINT)

    def _report(self, status: int, step: Step) -> None:
        expected = self.stopping or status in (Ending.DRAINED, Ending.RECYCLED)
        self.log("INFO" if expected else "ERROR", f"worker process {self.pid} ended with status {status}: {step.value}")

    def _pause(self) -> None:
        deadline = time.monotonic() + RESTART_PAUSE_SECONDS
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    def _start(self) -> None:
        """A fresh worker; stop signals wait meanwhile, so that none is passed to the pid just reaped."""
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.pid = os.posix_spawn(self.command[0], self.command, os.environ, setsigmask=())
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Log:
    """Lines in the service's two log formats (`herald.infra.logs`), written without `logging`: its import
    alone would double this process's memory of its own."""

    def __init__(self, log_format: str, level: str) -> None:
        self.json = log_format == "json"
        self.threshold = LEVELS.get(level, 20)

    def __call__(self, level: str, message: str) -> None:
        if LEVELS[level] < self.threshold:
            return
        now = time.time()
        if self.json:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}+00:00"
            line = json.dumps({"ts": stamp, "level": level, "logger": "worker", "message": message})
        else:
            stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
            line = f"{stamp} {level:<7} {os.getpid()} worker: {message}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def command(pid: int, burst: bool, log_format: str, level: str, restart: list[str]) -> list[str]:
    """How `worker.py` runs this script (by `os.execv`) to supervise its forked worker `pid`."""
    return [
        sys.executable,
        "-I",
        "-S",
        os.path.abspath(__file__),
        str(pid),
        str(int(burst)),
        log_format,
        level,
        *restart,
    ]


def main(argv: list[str]) -> int:
    pid, burst, log_format, level, *restart = argv
    return Supervisor(int(pid), burst == "1", restart, Log(log_format, level)).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
