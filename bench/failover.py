"""Failover: the Redis primary SIGKILLed while the API accepts jobs and workers run them.

`python -m bench.failover [--rounds 3] [--threads 8]` (root, Linux: it builds the hosts of
tests/test_hosts.py as network namespaces). Each round starts a fresh primary with two replicas and
three sentinels (`down-after-milliseconds` 1000) on host `redis`, the API and `scheduler.py` on
`api`, one `worker.py` on each of `w1` and `w2`; `--threads` clients on `client` POST `/jobs` in a
loop (a pause of 50 ms after a refusal). Once `--before` jobs were accepted the primary is killed;
the round ends when `--after` more were accepted, and then waits until every accepted job settles.
It prints, for REDIS_WAIT_REPLICAS=0 and =1: kill -> first 202 again (for a request sent after the
kill), 503 answers, jobs accepted (202), lost (accepted, never finished), duplicated (run twice), and
the latency of a 202 before the kill (the price of WAIT).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx2
from rq.job import Job

from tests.helpers import wait_until
from tests.multihost import SETTINGS, Cluster, Load, start_api, statuses
from tests.netns import Network, unavailable_reason
from tests.replication import ReplicaSet

SETTLED = {"finished", "failed", "missing"}


@dataclass
class Outcome:
    wait: int
    back_after: float
    refused: int
    accepted: int
    lost: int
    duplicated: int
    p50_ms: float
    p99_ms: float


def one_round(network: Network, wait: int, threads: int, before: int, after: int) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="failover-") as folder:
        host = network.hosts["redis"]
        nodes = ReplicaSet(Path(folder), host.address, range(6379, 6385), prefix=host.command())
        cluster = Cluster(network, Path(folder), nodes, network.hosts["client"].executor(4))
        try:
            cluster.on_client(nodes.start)
            cluster.env = {**os.environ, **SETTINGS, "REDIS_URL": nodes.url, "REDIS_WAIT_REPLICAS": str(wait)}
            start_api(cluster)
            cluster.start_workers("w1", "w2")
            load = run_load(cluster, threads, before, after)
            return settle(cluster, load, wait)
        finally:
            cluster.stop()
            cluster.client.shutdown()


def run_load(cluster: Cluster, threads: int, before: int, after: int) -> Load:
    with cluster.network.hosts["client"].executor(threads) as posting, httpx2.Client() as http:
        load = Load(cluster.api_url, http, after=after)
        futures = [posting.submit(load.run) for _ in range(threads)]
        cluster.on_client(lambda: wait_until(lambda: len(load.accepted) >= before, 60, 0.01, "jobs before the kill"))
        cluster.on_client(lambda: load.kill(cluster.nodes))
        for future in futures:
            future.result(timeout=120)
    return load


def settle(cluster: Cluster, load: Load, wait: int) -> Outcome:
    """Wait (at most 90 s) until every accepted job is finished, failed or gone; count the damage."""
    connection = cluster.on_client(cluster.redis)

    def settled() -> Counter[str]:
        found = statuses(connection, load.accepted)
        return found if set(found) <= SETTLED else Counter()

    try:
        final = cluster.on_client(lambda: wait_until(settled, 90, 0.5, "accepted jobs to settle"))
    except AssertionError:  # some never settle (their queue entry was lost): they count as lost
        final = cluster.on_client(lambda: statuses(connection, load.accepted))
    results = cluster.on_client(lambda: results_per_job(cluster, load.accepted))
    return Outcome(
        wait=wait,
        back_after=load.first_again - load.killed_at,
        refused=load.codes[503],
        accepted=len(load.accepted),
        lost=len(load.accepted) - final["finished"],
        duplicated=sum(1 for count in results if count > 1),
        p50_ms=percentile(load.latencies, 0.5) * 1000,
        p99_ms=percentile(load.latencies, 0.99) * 1000,
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def results_per_job(cluster: Cluster, job_ids: list[str]) -> list[int]:
    connection = cluster.redis()
    return [len(job.results()) for job in Job.fetch_many(job_ids, connection=connection) if job]


def table(outcomes: list[Outcome]) -> list[str]:
    lines = [
        f"{'WAIT':>4} {'kill -> 202 again':>18} {'503s':>6} {'accepted':>9} {'lost':>5} {'duplicated':>10}"
        f" {'202 p50 / p99 before the kill':>30}"
    ]
    for outcome in outcomes:
        lines.append(
            f"{outcome.wait:>4} {outcome.back_after:>16.1f} s {outcome.refused:>6} {outcome.accepted:>9}"
            f" {outcome.lost:>5} {outcome.duplicated:>10} {outcome.p50_ms:>20.1f} / {outcome.p99_ms:.1f} ms"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds for each REDIS_WAIT_REPLICAS value")
    parser.add_argument("--threads", type=int, default=8, help="client threads posting jobs")
    parser.add_argument("--before", type=int, default=500, help="jobs accepted before the kill")
    parser.add_argument("--after", type=int, default=300, help="jobs accepted after the API is back")
    args = parser.parse_args()
    if reason := unavailable_reason():
        sys.exit(f"bench.failover: {reason}")
    network = Network().start()
    outcomes = []
    try:
        for name in ("redis", "api", "w1", "w2", "client"):
            network.add(name)
        for wait in (0, 1):
            for _ in range(args.rounds):
                outcomes.append(one_round(network, wait, args.threads, args.before, args.after))
                print(table(outcomes[-1:])[-1], flush=True)
    finally:
        network.close()
    print("\n".join(table(outcomes)))


if __name__ == "__main__":
    main()
