"""docker-compose.sentinel.yml: a primary, two replicas, three sentinels; every service through Sentinel."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from herald.infra import connections
from tests.helpers import ROOT
from tests.test_compose import assert_docker_compose_accepts, assert_entry_point_exists, services_of, words

COMPOSE_FILE = ROOT / "docker-compose.sentinel.yml"
PASSWORDS = {"DASHBOARD_PASSWORD": "secret", "REDIS_PASSWORD": "redis-secret", "REDIS_SENTINEL_PASSWORD": "s-secret"}
DATA_NODES = ("redis-primary", "redis-replica-1", "redis-replica-2")
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return services_of(COMPOSE_FILE)


def test_every_python_service_finds_the_primary_through_the_three_sentinels(
    services: dict[str, dict[str, Any]],
) -> None:
    python_services = {name for name, service in services.items() if "build" in service}
    assert python_services == {"api", "worker", "scheduler"}
    for name in python_services:
        assert_entry_point_exists(words(services[name]["command"]))
        url = services[name]["environment"]["REDIS_URL"].replace("${REDIS_PASSWORD:?set REDIS_PASSWORD}", "pw")
        parsed = connections.parse_sentinel_url(url)
        assert parsed is not None and parsed.password == "pw" and parsed.master == "jobs"
        assert {host for host, _ in parsed.sentinels} == set(SENTINELS)
        assert services[name]["environment"]["REDIS_SENTINEL_PASSWORD"]


def test_two_replicas_of_the_primary_each_with_keyspace_events_and_the_same_password(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in DATA_NODES:
        command = " ".join(words(services[name]["command"]))
        assert "--notify-keyspace-events Kl" in command  # per server: replication does not carry it
        assert "--requirepass ${REDIS_PASSWORD:?set REDIS_PASSWORD}" in command
        assert "--masterauth ${REDIS_PASSWORD:?set REDIS_PASSWORD}" in command  # any node may become primary
        assert ("--replicaof redis-primary 6379" in command) == (name != "redis-primary")


def test_three_sentinels_watch_the_primary_with_a_quorum_of_two(services: dict[str, dict[str, Any]]) -> None:
    for name in SENTINELS:
        script = services[name]["command"][-1]
        assert "sentinel monitor jobs redis-primary 6379 2" in script
        assert "sentinel down-after-milliseconds jobs 1000" in script
        assert "requirepass $$REDIS_SENTINEL_PASSWORD" in script
        assert script.strip().splitlines()[-1] == "exec redis-sentinel /tmp/sentinel.conf"


def test_only_api_and_mailpit_publish_ports(services: dict[str, dict[str, Any]]) -> None:
    assert {name for name, service in services.items() if service.get("ports")} == {"api", "mailpit"}


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (v1) is not installed")
def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    assert_docker_compose_accepts(COMPOSE_FILE, PASSWORDS, tmp_path)
