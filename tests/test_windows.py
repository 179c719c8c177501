"""`worker.py` picks RQ's `SimpleWorker` on Windows (it cannot fork) and by default; the forking
`Worker` with WORKER_CLASS=fork elsewhere."""

from __future__ import annotations

import sys

import fakeredis
import pytest
from rq import SimpleWorker, Worker
from rq.worker import BaseWorker

import worker
from settings import Settings

CASES: list[tuple[str, str, type[BaseWorker]]] = [("win32", "fork", SimpleWorker), ("win32", "simple", SimpleWorker)]
CASES += [("linux", "simple", SimpleWorker), ("linux", "fork", Worker)]


@pytest.mark.parametrize(("platform", "kind", "expected"), CASES)
def test_build_worker_picks_the_worker_class_for_the_platform_and_setting(
    monkeypatch: pytest.MonkeyPatch, platform: str, kind: str, expected: type[BaseWorker]
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    built = worker.build_worker(Settings(worker_class=kind), connection=fakeredis.FakeRedis())
    assert isinstance(built, expected)
