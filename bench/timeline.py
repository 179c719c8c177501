"""Where a delivery's destination slot goes: the mixed deliveries of `bench.peer_bench`, timed per job.

`python -m bench.timeline [--deliveries 1000] [ENV=VALUE ...]` starts the benchmark's own stack (Valkey,
SMTP sink, API) with the sink and four webhook receivers holding every request 100 ms, queues
`--deliveries` notifications (in turn an email and a webhook to each receiver), starts `worker.py` with
the given settings (e.g. `WORKER_COUNT=2 WORKER_THREADS=12`) and measures, as the peers section does,
messages/s, worker CPU, Redis CPU and commands per delivery and the worker's PSS. Then, from each job's
own timestamps: how long it waited on its queue once it held its slot (promoted -> started), how long it
ran (started -> ended, the request's 100 ms included), and how long its slot stood free before the next
job of the same destination was promoted. A slot is held from promotion to end, so the first two are
what a delivery costs its destination beyond the receiver's own time.
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import sys
import tempfile
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from redis import Redis
from rq.utils import utcparse

from bench import peer_bench
from bench import stack as bench_stack

Timed = tuple[datetime, datetime, datetime, str]
"""promoted (enqueued_at), started_at, ended_at, the job's rate-limit key."""


TIMED_FIELDS = ("enqueued_at", "started_at", "ended_at", "rate_limit_key")


def timed_jobs(connection: Redis) -> list[Timed]:
    found = []
    for key in connection.scan_iter("rq:job:*", count=1000):
        fields = [
            _text(value) for value in connection.hmget(key, "enqueued_at", "started_at", "ended_at", "rate_limit_key")
        ]
        if all(fields[:3]):
            promoted, started, ended = (utcparse(value) for value in fields[:3])
            found.append((promoted, started, ended, fields[3]))
    return found


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else value or ""


def milliseconds(pairs: list[tuple[datetime, datetime]]) -> list[float]:
    return [(later - earlier).total_seconds() * 1000 for earlier, later in pairs]


def free_slot_ms(jobs: list[Timed]) -> list[float]:
    """For each job's end, how long until the next promotion of a job of the same destination."""
    by_key: dict[str, list[Timed]] = defaultdict(list)
    for job in jobs:
        by_key[job[3]].append(job)
    gaps = []
    for same in by_key.values():
        promotions = sorted(job[0] for job in same)
        for ended in sorted(job[2] for job in same):
            at = bisect.bisect_left(promotions, ended)
            if at < len(promotions):
                gaps.append((promotions[at] - ended).total_seconds() * 1000)
    return gaps


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    p5, *_, p95 = statistics.quantiles(values, n=20)
    return f"p50 {statistics.median(values):.1f}  (p5 {p5:.1f}, p95 {p95:.1f})"


def measure(deliveries: int, settings: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as workdir, bench_stack.running(Path(workdir)) as stack:
        setup = peer_bench.Setup("worker.py", "project", [sys.executable, "worker.py"], peer_bench.rq_pending)
        with peer_bench.slow_sink(), peer_bench.slow_receivers(), peer_bench.environment(settings):
            stack.flush()
            with stack.redis() as connection:
                peer_bench.enqueue(stack, Path(sys.executable), setup, "deliver", deliveries)
                process = stack.spawn("worker", setup.command)
                drained = peer_bench.measure_drained(connection, setup, process.pid, deliveries, cap=120)
                jobs = timed_jobs(connection)
            report(drained, jobs)


def report(drained: peer_bench.Drained, jobs: list[Timed]) -> None:
    print(f"{drained.done} deliveries: {drained.rate:.1f} msgs/s, PSS {drained.pss_mib:.1f} MiB; per delivery:")
    print(f"  worker CPU {drained.worker_cpu_ms:.2f} ms, Redis CPU {drained.redis_cpu_ms:.2f} ms", end=", ")
    print(f"{drained.redis_commands:.1f} Redis commands")
    print(f"promoted -> started, ms:  {spread(milliseconds([(job[0], job[1]) for job in jobs]))}")
    print(f"started -> ended, ms:     {spread(milliseconds([(job[1], job[2]) for job in jobs]))}")
    print(f"slot free -> next, ms:    {spread(free_slot_ms(jobs))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=1000)
    parser.add_argument("settings", nargs="*", metavar="ENV=VALUE", help="settings of the worker")
    args = parser.parse_args()
    measure(args.deliveries, dict(word.split("=", 1) for word in args.settings))


if __name__ == "__main__":
    main()
