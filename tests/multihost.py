"""The pieces of a multi-host run (tests/test_hosts.py, bench.failover): the processes of each host,
the client host's threads, and a load of API clients that watches a failover."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx2
from redis import Redis
from rq import Worker
from rq.job import Job

from herald.infra import connections
from tests.helpers import ROOT, stop_process, wait_until
from tests.netns import Network
from tests.replication import ReplicaSet

T = TypeVar("T")
RETRY_PAUSE_SECONDS = 0.05
WORKER_HOSTS = ("w1", "w2", "w3")
SETTINGS = {
    "ENVIRONMENT": "local",
    "WORKER_COUNT": "1",
    "JOB_HEARTBEAT_SECONDS": "1",
    "JOB_HEARTBEAT_GRACE_SECONDS": "2",
    "RECOVERY_SWEEP_SECONDS": "1",
    "WORKER_MAINTENANCE_INTERVAL_SECONDS": "1",
    "WORKER_TTL_SECONDS": "5",
    "RETRY_MAX": "3",
    "RETRY_BASE_SECONDS": "1",
    "RETRY_CAP_SECONDS": "1",
    "LOG_LEVEL": "WARNING",
}


@dataclass
class Cluster:
    network: Network
    workdir: Path
    nodes: ReplicaSet
    client: ThreadPoolExecutor
    env: dict[str, str] = field(default_factory=dict)
    processes: list[Any] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://{self.network.hosts['api'].address}:8000"

    def start(self, host: str, *args: str, **env: str) -> None:
        log = self.workdir / f"{host}-{Path(args[0]).stem}.log"
        command = [sys.executable, *args]
        self.processes.append(self.network.hosts[host].spawn(command, {**self.env, **env}, log, ROOT))

    def start_workers(self, *hosts: str) -> None:
        for host in hosts:
            self.start(host, "worker.py", TEST_HOST=host)
        self.on_client(lambda: wait_until(lambda: self.worker_hosts().keys() >= set(hosts), 30, 0.1, "workers"))

    def on_client(self, function: Callable[[], T]) -> T:
        """Run `function` on the client host (every connection it opens starts there)."""
        return self.client.submit(function).result()

    def redis(self) -> Redis:
        """A client of the primary through the sentinels; use it on the client host only."""
        return connections.make_client(self.nodes.url, socket_timeout=2, socket_connect_timeout=2)

    def worker_hosts(self) -> dict[str, str]:
        """Host name -> name of its live worker (from the address each worker registers)."""
        by_address = {host.address: name for name, host in self.network.hosts.items()}
        workers = Worker.all(connection=self.redis())
        return {by_address.get(worker.ip_address.rpartition(":")[0], "?"): worker.name for worker in workers}

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process, timeout=5)
        self.nodes.stop()


def start_api(cluster: Cluster) -> None:
    address = cluster.network.hosts["api"].address
    cluster.start("api", "-m", "uvicorn", "app:app", "--host", address, "--port", "8000", "--no-access-log")
    cluster.start("api", "scheduler.py")
    cluster.on_client(lambda: wait_until(lambda: _answers(f"{cluster.api_url}/healthz"), 30, 0.1, "the API"))


def _answers(url: str) -> bool:
    try:
        return httpx2.get(url, timeout=1).status_code == 200
    except httpx2.HTTPError:
        return False


def post_job(http: httpx2.Client, url: str) -> httpx2.Response:
    """One `noop` job through the API (one client for many: a new one costs tens of ms)."""
    return http.post(f"{url}/jobs", json={"task": "noop"}, timeout=5)


def statuses(connection: Redis, job_ids: list[str]) -> Counter[str]:
    jobs = Job.fetch_many(job_ids, connection=connection)
    return Counter(job.get_status(refresh=False).value if job else "missing" for job in jobs)


@dataclass
class Load:
    """Clients posting jobs until, after the primary's death, `after` more were accepted."""

    url: str
    http: httpx2.Client
    after: int = 50
    accepted: list[str] = field(default_factory=list)
    codes: Counter[int] = field(default_factory=Counter)
    killed_at: float = 0.0
    accepted_at_kill: int = 0
    first_again: float = 0.0
    latencies: list[float] = field(default_factory=list)
    """Seconds to each 202 before the kill."""

    def done(self) -> bool:
        return bool(self.first_again) and len(self.accepted) >= self.accepted_at_kill + self.after

    def run(self) -> None:
        while not self.done():
            sent = time.monotonic()
            try:
                answer = post_job(self.http, self.url)
            except httpx2.HTTPError:
                self.codes[0] += 1
                continue
            self.codes[answer.status_code] += 1
            if answer.status_code == 202:
                self.accepted.append(answer.json()["job_id"])
                if not self.killed_at:
                    self.latencies.append(time.monotonic() - sent)
                if self.killed_at and sent > self.killed_at and not self.first_again:
                    self.first_again = time.monotonic()
            else:
                time.sleep(RETRY_PAUSE_SECONDS)  # as a client honouring Retry-After would, briefly

    def kill(self, nodes: ReplicaSet) -> int:
        """SIGKILL the primary; its port."""
        self.accepted_at_kill = len(self.accepted)
        killed = nodes.kill_primary()
        self.killed_at = time.monotonic()
        return killed.port
