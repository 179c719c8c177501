"""docker-compose.yml and the Dockerfile: entry points exist, exposure and Redis durability as intended."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
PUBLISHED = {"api", "mailpit"}


def services_of(compose_file: Path) -> dict[str, dict[str, Any]]:
    compose: dict[str, Any] = yaml.safe_load(compose_file.read_text())
    return dict(compose["services"])


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return services_of(COMPOSE_FILE)


def words(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def assert_entry_point_exists(command: list[str]) -> None:
    """`python file.py`, `python -m module` or `uvicorn module:attr` must name something in this repo."""
    if command[0] == "uvicorn":
        module, _, attribute = command[1].partition(":")
        assert (ROOT / f"{module.replace('.', '/')}.py").is_file(), command
        assert hasattr(importlib.import_module(module), attribute), command
    elif command[0].startswith("python") and command[1] == "-m":
        assert importlib.util.find_spec(command[2]) is not None, command
    else:
        assert command[0].startswith("python") and (ROOT / command[1]).is_file(), command


def test_python_services_run_entry_points_of_this_repo(services: dict[str, dict[str, Any]]) -> None:
    python_services = {name for name, service in services.items() if "build" in service}
    assert python_services == {"api", "worker", "scheduler"}
    for name in python_services:
        assert_entry_point_exists(words(services[name]["command"]))


def test_dockerfile_runs_the_api_as_a_non_root_user() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert_entry_point_exists(json.loads(next(line for line in lines if line.startswith("CMD "))[4:]))
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")


def test_only_api_and_mailpit_publish_ports_on_localhost(services: dict[str, dict[str, Any]]) -> None:
    assert {name for name, service in services.items() if service.get("ports")} == PUBLISHED
    for name in PUBLISHED:
        for port in services[name]["ports"]:
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", (name, port)


def test_redis_keeps_an_append_only_file_and_never_evicts(services: dict[str, dict[str, Any]]) -> None:
    command = " ".join(words(services["redis"]["command"]))
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "--notify-keyspace-events Kl" in command
    assert services["redis"]["volumes"]


def test_redis_requires_a_password_that_every_python_service_uses(services: dict[str, dict[str, Any]]) -> None:
    command = " ".join(words(services["redis"]["command"]))
    assert "--requirepass ${REDIS_PASSWORD:?set REDIS_PASSWORD}" in command
    assert "-a" in words(services["redis"]["healthcheck"]["test"][-1])  # the healthcheck authenticates
    url = "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379/0"
    assert {services[name]["environment"]["REDIS_URL"] for name in ("api", "worker", "scheduler")} == {url}


def test_api_and_redis_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in ("api", "redis"):
        assert services[name]["healthcheck"]["test"], name
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    assert "container_name" not in services["worker"]
    assert "ports" not in services["worker"]


def assert_docker_compose_accepts(compose_file: Path, passwords: dict[str, str], tmp_path: Path) -> None:
    """`docker-compose config` accepts `compose_file` with every one of `passwords` set, and refuses it,
    saying which, with any one missing."""

    def config(**given: str) -> subprocess.CompletedProcess[str]:
        env = {key: value for key, value in os.environ.items() if key not in passwords} | given
        empty_env_file = tmp_path / "empty.env"  # so a developer's .env cannot set the passwords
        empty_env_file.touch()
        command = ["docker-compose", "--env-file", str(empty_env_file), "-f", str(compose_file), "config", "-q"]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    accepted = config(**passwords)
    assert accepted.returncode == 0, accepted.stderr
    for missing in passwords:
        refused = config(**{name: value for name, value in passwords.items() if name != missing})
        assert refused.returncode != 0
        assert f"set {missing}" in refused.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (v1) is not installed")
def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    passwords = {"DASHBOARD_PASSWORD": "secret", "REDIS_PASSWORD": "redis-secret"}
    assert_docker_compose_accepts(COMPOSE_FILE, passwords, tmp_path)
