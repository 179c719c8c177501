"""Hosts as Linux network namespaces, for the multi-host tests (root and `ip` needed).

One "switch" namespace holds a bridge; each host is a namespace with one veth whose peer is a port
of that bridge, and an address in a private subnet that exists only inside these namespaces: no
route, address or link is added to the machine's own namespace, and no traffic leaves them.
Namespace names start with this process's id, so concurrent runs never share or remove each
other's; those of runs whose process is gone are removed on the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000
NAME_PREFIX = "jt"
SUBNET = "10.231.7"
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def enter(namespace: str) -> None:
    """Move the calling thread into `namespace`: the sockets it opens from then on live there."""
    fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace} failed")
    finally:
        os.close(fd)


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    port_in_switch: str
    switch: str

    def command(self) -> list[str]:
        """Words that run a command on this host."""
        return ["ip", "netns", "exec", self.namespace]

    def spawn(self, args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as output:
            return subprocess.Popen(
                [*self.command(), *args],
                cwd=cwd,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill_everything(self) -> int:
        """SIGKILL every process of this host, as when its machine dies; how many there were."""
        pids = [int(pid) for pid in ip("netns", "pids", self.namespace, check=False).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def set_link(self, up: bool) -> None:
        """Plug or unplug this host's cable (its port on the switch)."""
        ip("-n", self.switch, "link", "set", self.port_in_switch, "up" if up else "down")

    def executor(self, threads: int = 1) -> ThreadPoolExecutor:
        """Threads living on this host: what they connect to, they reach from its address."""
        return ThreadPoolExecutor(threads, initializer=enter, initargs=(self.namespace,))

    def run(self, function: Callable[[], object]) -> object:
        with self.executor() as executor:
            return executor.submit(function).result()


@dataclass
class Network:
    prefix: str = field(default_factory=lambda: f"{NAME_PREFIX}{os.getpid():x}")
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def start(self) -> Network:
        remove_stale()
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        return self

    def add(self, name: str) -> Host:
        index = len(self.hosts) + 1
        namespace, port = f"{self.prefix}-{name}", f"p{index}"
        ip("netns", "add", namespace)
        ip("-n", namespace, "link", "set", "lo", "up")
        ip("-n", namespace, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.switch)
        ip("-n", namespace, "addr", "add", f"{SUBNET}.{index}/24", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        self.hosts[name] = Host(name, namespace, f"{SUBNET}.{index}", port, self.switch)
        return self.hosts[name]

    def close(self) -> None:
        """Kill every process left on the hosts, then remove every namespace (their links go with them)."""
        for host in self.hosts.values():
            host.kill_everything()
        for namespace in [*(host.namespace for host in self.hosts.values()), self.switch]:
            ip("netns", "del", namespace, check=False)


def remove_stale() -> None:
    """Remove the namespaces of earlier runs whose process is gone (a run killed before its cleanup)."""
    for name in ip("netns", "list", check=False).stdout.split():
        found = re.fullmatch(rf"{NAME_PREFIX}([0-9a-f]+)-.+", name)
        if found and not Path(f"/proc/{int(found[1], 16)}").exists():
            for pid in ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", name, check=False)
