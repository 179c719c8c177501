"""The peers section: the project's workers beside dramatiq, huey and celery, on the same jobs.

Each set-up drains the same queued jobs from the benchmark's Valkey: no-op jobs, then emails through
one SMTP sink that holds every message `SMTP_HOLD_SECONDS` (a slow server; the service's work waits on
the network), then mixed deliveries: notifications in turn by email and by webhook to each of
`WEBHOOK_HOSTS` (one receiver per loopback address, each holding every request as long; the
service's per-host limits apply, as the keys are host names). The peer's delivery task does the same
network work as the service's: one email on a kept SMTP session, or one POST on a new connection.
Measured from the first job done to the last (the queue's own count of finished or acknowledged
jobs, polled): jobs/s, CPU of the worker's processes and of Redis per job, Redis commands per job
(the benchmark's own polling subtracted), and the proportional set size (PSS) of the worker's
processes after the emails or deliveries. The peers run from their own environment, `var/bench-peers`, made here
with pip on first use: they are never dependencies of the service.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from redis import Redis

from bench.report import Row
from bench.stack import ROOT, Stack, _tree
from herald import mailsink
from tests.helpers import stop_process
from tests.receiver import Receiver

ENVIRONMENT = ROOT / "var" / "bench-peers"
REQUIREMENTS = ("dramatiq[redis]==2.2.1", "huey==3.5.4", "celery[redis]==5.7.0", "redis==8.1.0")
SMTP_HOLD_SECONDS = 0.1
"""How long the SMTP sink and each webhook receiver hold every request."""
WEBHOOK_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
POLL_SECONDS = 0.01
QUEUE = "bench"


def ensure_environment() -> Path:
    """The peers' Python, installing them into their own venv when it is missing or out of date."""
    python, marker = ENVIRONMENT / "bin" / "python", ENVIRONMENT / "bench-requirements.txt"
    wanted = "\n".join(REQUIREMENTS)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(ENVIRONMENT)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS], check=True)
    marker.write_text(wanted)
    return python


Pending = Callable[[Redis, int], int]
"""How many of `count` queued jobs are not done yet, read from Redis in one command."""


def _dramatiq_pending(connection: Redis, count: int) -> int:
    return int(connection.hlen(f"dramatiq:{QUEUE}.msgs"))  # a message leaves the hash when acknowledged


def _huey_pending(connection: Redis, count: int) -> int:
    return int(connection.llen(f"huey.redis.{QUEUE}"))


def _celery_pending(connection: Redis, count: int) -> int:
    return int(connection.eval("return redis.call('LLEN', KEYS[1]) + redis.call('HLEN', KEYS[2])", 2, QUEUE, "unacked"))


def rq_pending(connection: Redis, count: int) -> int:
    return count - int(connection.eval(_RQ_FINISHED, 0))


_RQ_FINISHED = """
local n = 0
for _, q in ipairs({'high', 'default', 'low'}) do n = n + redis.call('ZCARD', 'rq:finished:' .. q) end
return n
"""


@dataclass(frozen=True)
class Setup:
    name: str
    peer: str
    """dramatiq, huey, celery; or `project` for worker.py."""
    command: list[str]
    pending: Pending
    env: tuple[tuple[str, str], ...] = ()
    """Settings of this set-up, for its workers and for the enqueueing here."""


def setups(python: Path) -> dict[str, Setup]:
    """The worker set-ups, by name: the peers with one worker, dramatiq with its defaults, and ours."""
    bin_dir = python.parent
    dramatiq = [str(bin_dir / "dramatiq"), "bench.peers.dramatiq_tasks"]
    celery = [str(bin_dir / "celery"), "-A", "bench.peers.celery_tasks", "worker", "-Q", QUEUE, "--pool", "prefork"]
    celery += ["--concurrency", "1", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"]
    huey = [str(bin_dir / "huey_consumer"), "bench.peers.huey_tasks.huey", "-w", "1", "-k", "thread"]
    one_process = ["--processes", "1", "--threads"]
    uncapped = (*THREADS_8, ("SMTP_CONCURRENCY", "16"))
    found = [
        Setup("dramatiq, 1 process, 8 threads", "dramatiq", [*dramatiq, *one_process, "8"], _dramatiq_pending),
        Setup("dramatiq, 1 process, 1 thread", "dramatiq", [*dramatiq, *one_process, "1"], _dramatiq_pending),
        Setup("dramatiq, its defaults", "dramatiq", dramatiq, _dramatiq_pending),
        Setup("huey, 1 worker thread", "huey", huey, _huey_pending),
        Setup("celery prefork, concurrency 1", "celery", celery, _celery_pending),
        Setup("worker.py --processes 1", "project", [sys.executable, "worker.py", "--processes", "1"], rq_pending),
        Setup(ONE_AT_A_TIME, "project", [sys.executable, "worker.py", "--processes", "1"], rq_pending, THREADS_1),
        Setup("worker.py, default set-up", "project", [sys.executable, "worker.py"], rq_pending),
        Setup(THREADED, "project", [sys.executable, "worker.py"], rq_pending, THREADS_8),
        Setup(UNCAPPED, "project", [sys.executable, "worker.py"], rq_pending, uncapped),
        *(Setup(name, "project", [sys.executable, "worker.py"], rq_pending, env) for name, env in SHAPES.items()),
    ]
    return {setup.name: setup for setup in found}


NOOP_SETUPS = (
    "dramatiq, 1 process, 8 threads",
    "dramatiq, 1 process, 1 thread",
    "huey, 1 worker thread",
    "celery prefork, concurrency 1",
    "worker.py --processes 1",
    "worker.py --processes 1, WORKER_THREADS=1",
)
THREADS_8 = (("WORKER_THREADS", "8"),)
THREADS_1 = (("WORKER_THREADS", "1"),)
ONE_AT_A_TIME = NOOP_SETUPS[-1]
"""One job at a time, as the peers it is measured against (celery with concurrency 1, dramatiq with 1 thread,
huey with 1 worker thread); the default runs WORKER_THREADS jobs at once, whose threads share one GIL."""
THREADED = "worker.py, WORKER_THREADS=8"
"""The default 2 processes, each running 8 jobs at once: the 16 deliveries in flight of dramatiq's defaults."""
UNCAPPED = "worker.py, WORKER_THREADS=8, SMTP_CONCURRENCY=16"
"""The same with the SMTP server's limit at 16, as dramatiq has none."""
SHAPES = {
    f"worker.py, {count} x {threads} threads": (("WORKER_COUNT", str(count)), ("WORKER_THREADS", str(threads)))
    for count, threads in ((2, 12), (2, 8), (1, 16), (2, 1))
}
"""Other shapes of the same worker, processes x threads per process (the default: 1 x 24): the default's 24
in flight over one process per core; dramatiq's 16 in flight, split as dramatiq splits them and in one
process; and one job at a time per process."""
DELIVERY_SETUPS = ("dramatiq, its defaults", "worker.py, default set-up", *SHAPES)
EMAIL_SETUPS = (
    "dramatiq, its defaults",
    "dramatiq, 1 process, 8 threads",
    "huey, 1 worker thread",
    "celery prefork, concurrency 1",
    "worker.py, default set-up",
    THREADED,
    UNCAPPED,
)


@dataclass(frozen=True)
class Drained:
    done: int
    seconds: float
    worker_cpu_ms: float
    redis_cpu_ms: float
    redis_commands: float
    pss_mib: float

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Sample:
    at: float
    worker_cpu: float
    redis_cpu: float
    redis_commands: int


def sample(connection: Redis, pid: int) -> Sample:
    info = connection.info()
    redis_cpu = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return Sample(time.perf_counter(), cpu_seconds(pid), redis_cpu, int(info["total_commands_processed"]))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its descendants (ended children included)."""
    total = 0
    for member in _tree(pid):
        with suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
            total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def pss_mib(pid: int) -> float:
    """Proportional set size of a process tree: shared pages counted once, split among sharers."""
    total = 0
    for member in _tree(pid):
        with suppress(OSError):
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


def enqueue(stack: Stack, python: Path, setup: Setup, task: str, count: int) -> None:
    if setup.peer == "project":
        _enqueue_project(task, count)
        return
    subprocess.run([str(python), "-m", "bench.peers.enqueue", setup.peer, task, str(count)], cwd=ROOT, check=True)


def _enqueue_project(task: str, count: int) -> None:
    from herald.jobs import enqueue
    from settings import Settings

    settings = Settings()
    if task == "deliver":
        _enqueue_notifications(count)
        return
    if task == "noop":
        for _ in range(count):
            enqueue.enqueue_task(settings, "noop", {})
        return
    emails = [{"to": f"user{n}@example.com", "subject": "Mail", "body": "Hello"} for n in range(count)]
    for first in range(0, count, 500):
        enqueue.enqueue_emails(settings, emails[first : first + 500], "default")


def _enqueue_notifications(count: int) -> None:
    """`count` notifications through the service's own function, each with one delivery, in turn an
    email and a webhook to each receiver (as `bench.peers.common.deliver` numbers them)."""
    from herald.notify import dispatch
    from herald.schemas import NotificationRequest
    from settings import Settings

    settings = Settings()
    urls = os.environ["BENCH_WEBHOOK_URLS"].split(",")
    for number in range(count):
        turn = number % (len(urls) + 1)
        target = {"webhook_url": urls[turn - 1]} if turn else {"to": f"user{number}@example.com"}
        channel = "webhook" if turn else "email"
        request = NotificationRequest(user_id=f"u{number}", channels=[channel], title="Mail", body="Hello", **target)
        dispatch.create_notification(settings, request, f"bench-{number}")


def drain(stack: Stack, python: Path, setup: Setup, task: str, count: int, cap: float) -> Drained:
    """Queue `count` jobs, start the set-up, measure from its first job done to its last (or `cap` s)."""
    stack.flush()
    with settings_of(setup), stack.redis() as connection:
        enqueue(stack, python, setup, task, count)
        process = stack.spawn(setup.name, setup.command)
        try:
            return measure_drained(connection, setup, process.pid, count, cap)
        finally:
            stop_process(process)
            stack.flush()


def measure_drained(connection: Redis, setup: Setup, pid: int, count: int, cap: float) -> Drained:
    deadline = time.perf_counter() + cap + 30  # start-up counts against nothing but this bound
    while (pending := setup.pending(connection, count)) >= count and time.perf_counter() < deadline:
        time.sleep(POLL_SECONDS)
    first, polls = sample(connection, pid), 0
    start_pending, deadline = pending, min(deadline, first.at + cap)
    while pending > 0 and time.perf_counter() < deadline:
        time.sleep(POLL_SECONDS)
        pending, polls = setup.pending(connection, count), polls + 1
    last, done = sample(connection, pid), start_pending - pending
    pss = pss_mib(pid)
    jobs = max(done, 1)
    commands = last.redis_commands - first.redis_commands - polls - 1  # minus our polls and the INFO
    return Drained(
        done,
        last.at - first.at,
        (last.worker_cpu - first.worker_cpu) * 1000 / jobs,
        (last.redis_cpu - first.redis_cpu) * 1000 / jobs,
        commands / jobs,
        pss,
    )


def settings_of(setup: Setup) -> contextlib.AbstractContextManager[None]:
    """The set-up's settings in this process's environment (and so its children's) while it runs."""
    return environment(dict(setup.env))


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in this process's environment (and so its children's), and in its settings, meanwhile."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    _reset_settings()
    try:
        yield
    finally:
        _restore(saved)


def _restore(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _reset_settings()


@contextmanager
def slow_sink() -> Iterator[int]:
    """An SMTP sink holding each message `SMTP_HOLD_SECONDS`; its port, also in the children's env."""
    sink = mailsink.MailSink()
    sink.hold = SMTP_HOLD_SECONDS
    controller = mailsink.start(sink)
    try:
        with environment({"SMTP_PORT": str(controller.port), "BENCH_SMTP_PORT": str(controller.port)}):
            yield int(controller.port)
    finally:
        controller.stop()


@contextmanager
def slow_receivers() -> Iterator[list[str]]:
    """A webhook receiver on each of `WEBHOOK_HOSTS`, holding each request `SMTP_HOLD_SECONDS`; their
    URLs, also in the children's env; private targets allowed meanwhile (they are loopback)."""
    receivers = [Receiver(host=host) for host in WEBHOOK_HOSTS]
    for receiver in receivers:
        receiver.delay = SMTP_HOLD_SECONDS
        receiver.start()
    urls = [f"{receiver.url}/hook" for receiver in receivers]
    try:
        with environment({"BENCH_WEBHOOK_URLS": ",".join(urls), "WEBHOOK_ALLOW_PRIVATE": "true"}):
            yield urls
    finally:
        for receiver in receivers:
            receiver.stop()


def _reset_settings() -> None:
    from settings import get_settings

    get_settings.cache_clear()


def make_rows() -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for name in NOOP_SETUPS:
        rows[f"peer noop {name}"] = Row(f"{name}: no-op jobs", "jobs/s", "best peer", _target(name, "≥1x celery"))
        rows[f"peer cpu {name}"] = Row(f"{name}: worker CPU per job", "ms", "best peer (least)")
        rows[f"peer rcpu {name}"] = Row(f"{name}: Redis CPU per job", "ms", "best peer (least)", _target(name, "≤0.3"))
        rows[f"peer cmds {name}"] = Row(f"{name}: Redis commands per job", "cmds", "best peer (least)")
    for name in EMAIL_SETUPS:
        target = _target(name, "≥ dramatiq defaults")
        rows[f"peer mail {name}"] = Row(f"{name}: emails, sink holds each 100 ms", "mails/s", "best peer", target)
        target = _target(name, "≤ dramatiq defaults")
        rows[f"peer pss {name}"] = Row(f"{name}: PSS after the emails", "MiB", "best peer (least)", target)
    mixed = f"deliveries, email + webhooks to {len(WEBHOOK_HOSTS)} hosts, each held 100 ms"
    for name in DELIVERY_SETUPS:
        target = _target(name, "≥1x")
        rows[f"peer mixed {name}"] = Row(f"{name}: {mixed}", "msgs/s", "dramatiq, its defaults", target)
        target = _target(name, "≤1x")
        rows[f"peer mpss {name}"] = Row(f"{name}: PSS after the deliveries", "MiB", "dramatiq, its defaults", target)
    return rows


def _target(name: str, target: str) -> str:
    return target if name.startswith("worker.py") else ""


SECTION_KEYS = (
    *(f"peer {metric} {name}" for name in NOOP_SETUPS for metric in ("noop", "cpu", "rcpu", "cmds")),
    *(f"peer {metric} {name}" for name in EMAIL_SETUPS for metric in ("mail", "pss")),
)
DELIVERY_KEYS = tuple(f"peer {metric} {name}" for name in DELIVERY_SETUPS for metric in ("mixed", "mpss"))


def measure(stack: Stack, rows: dict[str, Row], runs: int, noop_jobs: int, emails: int, cap: float) -> None:
    """`runs` rounds of every set-up, each round in a rotated order; each figure beside the best peer's."""
    python = ensure_environment()
    found = setups(python)
    os.environ["BENCH_REDIS_URL"] = stack.redis_url
    for run in range(runs):
        noop = {name: drain(stack, python, found[name], "noop", noop_jobs, cap) for name in _rotated(NOOP_SETUPS, run)}
        _add_noop(rows, noop)
        with slow_sink():
            order = _rotated(EMAIL_SETUPS, run)
            mail = {name: drain(stack, python, found[name], "send_email", emails, cap) for name in order}
        _add_mail(rows, mail)


def measure_deliveries(stack: Stack, rows: dict[str, Row], runs: int, deliveries: int, cap: float) -> None:
    """`runs` rounds of the mixed deliveries on every delivery set-up, each round in a rotated order;
    each figure beside dramatiq's defaults in the same round."""
    python = ensure_environment()
    found = setups(python)
    os.environ["BENCH_REDIS_URL"] = stack.redis_url
    for run in range(runs):
        with slow_sink(), slow_receivers():
            order = _rotated(DELIVERY_SETUPS, run)
            mixed = {name: drain(stack, python, found[name], "deliver", deliveries, cap) for name in order}
        _add_mixed(rows, mixed)


def _rotated(names: tuple[str, ...], run: int) -> list[str]:
    shift = run % len(names)
    return [*names[shift:], *names[:shift]]


def _peers(results: dict[str, Drained]) -> list[Drained]:
    return [result for name, result in results.items() if not name.startswith("worker.py")]


def _add_noop(rows: dict[str, Row], results: dict[str, Drained]) -> None:
    peers = _peers(results)
    for name, result in results.items():
        _add(rows[f"peer noop {name}"], result.rate, max(peer.rate for peer in peers))
        _add(rows[f"peer cpu {name}"], result.worker_cpu_ms, min(peer.worker_cpu_ms for peer in peers))
        _add(rows[f"peer rcpu {name}"], result.redis_cpu_ms, min(peer.redis_cpu_ms for peer in peers))
        _add(rows[f"peer cmds {name}"], result.redis_commands, min(peer.redis_commands for peer in peers))


def _add_mail(rows: dict[str, Row], results: dict[str, Drained]) -> None:
    peers = _peers(results)
    for name, result in results.items():
        _add(rows[f"peer mail {name}"], result.rate, max(peer.rate for peer in peers))
        _add(rows[f"peer pss {name}"], result.pss_mib, min(peer.pss_mib for peer in peers))


def _add_mixed(rows: dict[str, Row], results: dict[str, Drained]) -> None:
    peer = results["dramatiq, its defaults"]
    for name, result in results.items():
        _add(rows[f"peer mixed {name}"], result.rate, peer.rate)
        _add(rows[f"peer mpss {name}"], result.pss_mib, peer.pss_mib)


def _add(row: Row, value: float, best: float) -> None:
    row.samples.append(value)
    row.baseline_samples.append(best)
