"""The embedded Redis of the run command (`serve.start_embedded_redis`) with its default settings: an
append-only file fsynced every second and `noeviction`; a SIGKILL of it loses no accepted job."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue

from herald import serve
from herald.infra import connections
from herald.mailsink import free_port
from settings import Settings
from tests.helpers import wait_until

EMAIL = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}


@pytest.fixture
def embedded(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], tmp_path: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`REDIS_URL` on a free port where nothing runs yet; the embedded servers started there, stopped after."""
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    connections.client_for.cache_clear()
    servers: list[subprocess.Popen[bytes]] = []
    yield servers
    for server in servers:
        server.kill()
        server.wait()
    connections.client_for.cache_clear()


def _append_only_files(var: Path) -> bytes:
    """What the server has written to its append-only file(s) so far (as the kernel holds it)."""
    return b"".join(path.read_bytes() for path in sorted((var / "redis").rglob("*.aof")))


def test_a_sigkilled_embedded_redis_keeps_every_accepted_job(
    embedded: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """SIGKILL ends the process only: whatever it wrote to the file survives, fsynced or not (everysec's
    second of loss is a power cut's or kernel crash's). So the test waits until every job id is in the
    file, which the server writes before or, with a slow disk, up to 2 s after answering; then kills it."""
    settings = Settings()
    assert settings.redis_appendfsync == "everysec"
    embedded.append(serve.start_embedded_redis(settings.redis_url, settings, tmp_path))
    with Redis.from_url(settings.redis_url) as connection:
        config = connection.config_get("appendonly", "appendfsync", "maxmemory-policy")
    assert config == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}

    with TestClient(__import__("app").create_app(settings)) as client:
        accepted = [client.post("/send-email", json={**EMAIL, "subject": f"n{n}"}) for n in range(20)]
    assert [answer.status_code for answer in accepted] == [202] * 20
    ids = [answer.json()["job_id"] for answer in accepted]
    wait_until(lambda: all(job_id.encode() in _append_only_files(tmp_path) for job_id in ids), what="the writes")
    embedded[0].kill()
    embedded[0].wait()

    embedded.append(serve.start_embedded_redis(settings.redis_url, settings, tmp_path))
    with TestClient(__import__("app").create_app(settings)) as client:
        assert [client.get(f"/job/{job_id}").json().get("status") for job_id in ids] == ["queued"] * 20
    with Redis.from_url(settings.redis_url) as connection:
        assert Queue("default", connection=connection).job_ids == ids
