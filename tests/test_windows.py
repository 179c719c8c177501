"""Windows cannot fork: `worker.py` must pick RQ's `SimpleWorker` there, the forking `Worker` elsewhere."""

from __future__ import annotations

import sys

import fakeredis
import pytest
from rq import SimpleWorker, Worker

import worker


@pytest.mark.parametrize(("platform", "expected"), [("win32", SimpleWorker), ("linux", Worker)])
def test_build_worker_picks_the_worker_class_for_the_platform(
    monkeypatch: pytest.MonkeyPatch, platform: str, expected: type[Worker]
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    built = worker.build_worker(connection=fakeredis.FakeRedis())
    assert isinstance(built, expected)
