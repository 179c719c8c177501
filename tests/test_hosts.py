"""Workers on several hosts, and Sentinel failover, on real hosts made of network namespaces.

Hosts: `redis` (a primary, two replicas, three sentinels), `api` (uvicorn and `scheduler.py`),
`w1`..`w3` (one `worker.py` each) and `client` (this test's threads, which reach the others over the
bridge as any client would). Every process runs in its host's namespace; all is removed afterwards.
Recovery settings are short (heartbeat 1 s, grace 2 s, sweep 1 s) so that the group stays quick.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from redis import Redis
from rq import Queue, Retry, Worker
from rq.job import Job, JobStatus

from tests import hosttasks
from tests.helpers import stop_process, wait_until
from tests.multihost import SETTINGS, WORKER_HOSTS, Cluster, Load, post_job, start_api, statuses
from tests.netns import Network, unavailable_reason
from tests.replication import ReplicaSet

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    net = Network().start()
    try:
        for name in ("redis", "api", *WORKER_HOSTS, "client"):
            net.add(name)
        yield net
    finally:
        net.close()


@pytest.fixture(scope="module")
def stack(network: Network) -> Iterator[Cluster]:
    """A replica set on `redis`; the API (REDIS_WAIT_REPLICAS=1) and the scheduler on `api`."""
    with tempfile.TemporaryDirectory(prefix="test-hosts-") as folder:
        redis_host = network.hosts["redis"]
        nodes = ReplicaSet(Path(folder), redis_host.address, range(6379, 6385), prefix=redis_host.command())
        client = network.hosts["client"].executor(8)
        running = Cluster(network, Path(folder), nodes, client)
        try:
            running.on_client(nodes.start)
            running.env = {**os.environ, **SETTINGS, "REDIS_URL": nodes.url, "REDIS_WAIT_REPLICAS": "1"}
            start_api(running)
            yield running
        finally:
            running.stop()
            client.shutdown()


@pytest.fixture
def cluster(stack: Cluster) -> Iterator[Cluster]:
    """The stack, emptied; the workers a test starts are stopped after it."""
    stack.on_client(lambda: stack.redis().flushall())
    already = len(stack.processes)
    try:
        yield stack
    finally:
        for process in stack.processes[already:]:
            stop_process(process, timeout=5)
        del stack.processes[already:]


def runs(connection: Redis, key: str) -> list[tuple[str, str]]:
    """(job id, host) of every run recorded by `hosttasks.record` under `key`."""
    entries: list[bytes] = connection.lrange(key, 0, -1)  # type: ignore[assignment]
    return [(words[0], words[1]) for words in (entry.decode().split() for entry in entries)]


def first_worker(connection: Redis) -> str:
    """The worker that made the first recorded run."""
    first: bytes = connection.lindex(hosttasks.STARTS_KEY, 0)  # type: ignore[assignment]
    return first.decode().split()[-1]


def test_spread_600_jobs_over_three_worker_hosts_each_runs_once(cluster: Cluster) -> None:
    cluster.start_workers(*WORKER_HOSTS)
    names = cluster.on_client(cluster.worker_hosts)
    with cluster.network.hosts["client"].executor(8) as posting, httpx2.Client() as http:
        answers = list(posting.map(lambda _: post_job(http, cluster.api_url), range(600)))
    assert Counter(answer.status_code for answer in answers) == {202: 600}
    job_ids = [answer.json()["job_id"] for answer in answers]

    def all_finished() -> bool:
        return statuses(cluster.redis(), job_ids) == {"finished": 600}

    cluster.on_client(lambda: wait_until(all_finished, 60, 0.2, "600 jobs to finish"))
    jobs = cluster.on_client(lambda: Job.fetch_many(job_ids, connection=cluster.redis()))
    assert all(job is not None and len(job.results()) == 1 for job in jobs)  # exactly one run each
    host_of = {worker: host for host, worker in names.items()}
    shares = Counter(host_of.get(job.worker_name or "", "?") for job in jobs if job)
    print(f"jobs run per worker host: {dict(shares)}")
    assert set(shares) == set(WORKER_HOSTS)


def test_a_worker_host_that_dies_mid_load_loses_no_job(cluster: Cluster) -> None:
    cluster.start_workers(*WORKER_HOSTS)
    connection = cluster.on_client(cluster.redis)

    def enqueue() -> list[str]:
        queue = Queue("default", connection=connection)
        retry = Retry(max=3, interval=1)
        return [queue.enqueue(hosttasks.record, 0.3, retry=retry).id for _ in range(60)]

    job_ids = cluster.on_client(enqueue)
    cluster.on_client(lambda: wait_until(lambda: len(runs(connection, hosttasks.STARTS_KEY)) >= 12, 30, 0.05))
    killed = cluster.network.hosts["w1"].kill_everything()
    assert killed >= 1
    starts = cluster.on_client(lambda: runs(connection, hosttasks.STARTS_KEY))
    ends = cluster.on_client(lambda: runs(connection, hosttasks.ENDS_KEY))
    in_flight = {job for job, host in starts if host == "w1"} - {job for job, host in ends if host == "w1"}
    assert in_flight, "w1 ran no job when it was killed"
    cluster.on_client(
        lambda: wait_until(lambda: statuses(connection, job_ids) == {"finished": 60}, 60, 0.2, "every job to finish")
    )
    ends = cluster.on_client(lambda: runs(connection, hosttasks.ENDS_KEY))
    assert in_flight <= {job for job, host in ends if host != "w1"}
    print(f"w1 killed with {len(in_flight)} job(s) in flight; all run again elsewhere")


def test_a_worker_host_cut_off_mid_job_does_not_overwrite_its_outcome(cluster: Cluster) -> None:
    cluster.start_workers("w1")
    connection = cluster.on_client(cluster.redis)

    def enqueue() -> str:
        queue = Queue("default", connection=connection)
        job = queue.enqueue(hosttasks.record, 0.1, slow_on="w1", slow_seconds=8, fail_on="w1", retry=Retry(max=2))
        return str(job.id)

    job_id = cluster.on_client(enqueue)
    cluster.on_client(lambda: wait_until(lambda: runs(connection, hosttasks.STARTS_KEY), 30, 0.05, "w1 to start"))
    cluster.start_workers("w2")
    w1 = cluster.network.hosts["w1"]
    w1.set_link(False)
    try:
        cluster.on_client(
            lambda: wait_until(lambda: statuses(connection, [job_id]) == {"finished": 1}, 30, 0.1, "w2 to run it")
        )
    finally:
        w1.set_link(True)
    w1_worker = cluster.on_client(lambda: first_worker(connection))

    def w1_run_ended() -> bool:
        """w1's run returned (or raised) and its worker has dealt with the end (it is idle, or gone)."""
        exited = any(host == "w1" for _, host in runs(connection, hosttasks.EXITS_KEY))
        worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + w1_worker, connection=connection)
        return exited and (worker is None or (worker.get_state() == "idle" and not worker.get_current_job_id()))

    cluster.on_client(lambda: wait_until(w1_run_ended, 30, 0.1, "w1 to end its run"))
    job = cluster.on_client(lambda: Job.fetch(job_id, connection=connection))
    assert job.get_status() == JobStatus.FINISHED
    assert job.return_value() == "w2"
    starts = cluster.on_client(lambda: runs(connection, hosttasks.STARTS_KEY))
    print(f"runs of the job: {[host for _, host in starts]}: {len(starts) - 1} duplicate(s)")
    assert [host for _, host in starts] == ["w1", "w2"]


def test_the_primary_dies_under_load_and_with_wait_1_no_accepted_job_is_lost(cluster: Cluster) -> None:
    cluster.start_workers("w1", "w2")
    with cluster.network.hosts["client"].executor(4) as posting, httpx2.Client() as http:
        load = Load(cluster.api_url, http)
        futures = [posting.submit(load.run) for _ in range(4)]
        cluster.on_client(lambda: wait_until(lambda: len(load.accepted) >= 100, 30, 0.01, "jobs before the kill"))
        old_primary = cluster.on_client(lambda: load.kill(cluster.nodes))
        for future in futures:
            future.result(timeout=90)
    assert cluster.on_client(cluster.nodes.primary).port != old_primary  # a replica was promoted
    assert set(load.codes) <= {202, 503}, load.codes
    connection = cluster.on_client(cluster.redis)

    def settled() -> Counter[str]:
        found = statuses(connection, load.accepted)
        return found if set(found) <= {"finished", "failed", "missing"} else Counter()

    final = cluster.on_client(lambda: wait_until(settled, 60, 0.2, "every accepted job to settle"))
    jobs = cluster.on_client(lambda: Job.fetch_many(load.accepted, connection=connection))
    duplicates = sum(len(job.results()) - 1 for job in jobs if job)
    lost = len(load.accepted) - final["finished"]
    print(
        f"kill -> first 202 again: {load.first_again - load.killed_at:.1f} s; answers {dict(load.codes)}; "
        f"accepted {len(load.accepted)}; lost {lost}; duplicated {duplicates}"
    )
    assert final == {"finished": len(load.accepted)}
