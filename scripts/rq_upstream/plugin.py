"""pytest plugin (`-p rq_upstream.plugin`): RQ's own tests, run with the project's classes under RQ's names.

RQ's test modules take their classes by name (`from rq import Worker`, `from rq.worker import
SimpleWorker`, `from rq.queue import Queue`). Before collection this sets those names, in `rq`,
`rq.worker` and `rq.queue`, to the adapter's classes, so a test module binds ours when it is
imported. RQ's own modules bound theirs at their import and keep them; `rq.queue.Queue` is put back
after collection, since RQ's queue code reads that global itself (`isinstance(other, Queue)`) and
`Job` imports it inside functions. The stock `rq worker` command that some tests start gets ours
through RQ's own `RQ_WORKER_CLASS` and `RQ_QUEUE_CLASS`.

The differences file (`RQ_UPSTREAM_DIFFERENT`) lists upstream tests whose promise does not hold for
us, one a line: `test id  # differs: why` runs the test as a strict expected failure (a test that
starts to pass, after a fix or an RQ upgrade, fails the run until its line goes), and
`test id  # not run: why` deselects it. Both are reported with their reasons. An entry naming no
collected test, or with no kind or reason, stops the run: the list stays true when RQ is upgraded.
After collection every test module must hold our classes under RQ's names, else the run stops: the
swap did not reach it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import rq
import rq.queue
import rq.worker
from rq import Queue, SimpleWorker, Worker

from rq_upstream import adapter

STOCK: dict[str, type] = {"Worker": Worker, "SimpleWorker": SimpleWorker, "Queue": Queue}
"""RQ's classes, kept before the swap."""
SWAPPED: tuple[tuple[ModuleType, str], ...] = (
    (rq, "Worker"),
    (rq.worker, "Worker"),
    (rq, "SimpleWorker"),
    (rq.worker, "SimpleWorker"),
    (rq, "Queue"),
    (rq.queue, "Queue"),
)
"""Where the test modules find RQ's classes: the names set to ours."""
SIMPLE_WORKER_ENV = "RQ_UPSTREAM_SIMPLE_WORKER"
DIFFERENT_ENV = "RQ_UPSTREAM_DIFFERENT"


def stand_ins() -> dict[str, type]:
    """RQ's class names -> the project's classes that replace them in this run."""
    threaded = os.environ.get(SIMPLE_WORKER_ENV) == "threaded"
    simple = adapter.THREADED_WORKER if threaded else adapter.SIMPLE_WORKER
    return {"Worker": adapter.WORKER, "SimpleWorker": simple, "Queue": adapter.QUEUE}


def swap_classes() -> None:
    """Put the project's classes under RQ's public names, and tell RQ's command line (`rq worker`,
    which some tests start in a subprocess) to use them, through its own settings."""
    classes = stand_ins()
    for module, name in SWAPPED:
        setattr(module, name, classes[name])
    os.environ["RQ_WORKER_CLASS"] = f"{classes['Worker'].__module__}.{classes['Worker'].__qualname__}"
    os.environ["RQ_QUEUE_CLASS"] = f"{classes['Queue'].__module__}.{classes['Queue'].__qualname__}"


DIFFERS = "differs: "
NOT_RUN = "not run: "


def read_differences(path: Path) -> dict[str, str]:
    """Test id -> `differs: why` or `not run: why`, from lines `test id  # ...`; blank and `#` lines skipped."""
    differences: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        test_id, _, why = line.partition("  # ")
        if not why.startswith((DIFFERS, NOT_RUN)) or not why.partition(": ")[2].strip():
            raise pytest.UsageError(f"{path}:{number}: not `test id  # differs: why` or `# not run: why`: {line!r}")
        differences[test_id.strip()] = why.strip()
    return differences


def modules_without_our_classes(items: list[pytest.Item]) -> list[str]:
    """Collected test modules (and RQ's test fixtures) that hold one of RQ's own classes under its name."""
    modules = {module for item in items if (module := _module_of(item)) is not None}
    if "tests.fixtures" in sys.modules:
        modules.add(sys.modules["tests.fixtures"])
    return sorted(
        f"{module.__name__}.{name}"
        for module in modules
        for name, stock in STOCK.items()
        if getattr(module, name, None) is stock
    )


def _module_of(item: pytest.Item) -> ModuleType | None:
    parent = item.getparent(pytest.Module)
    return parent.obj if parent is not None else None


def pytest_configure(config: pytest.Config) -> None:
    swap_classes()
    config.stash[_differences] = read_differences(Path(os.environ[DIFFERENT_ENV]))


@pytest.hookimpl(tryfirst=True)  # sees every collected test, before `-k` or `--last-failed` select some
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    differences = config.stash[_differences]
    unknown = sorted(set(differences) - {item.nodeid for item in items})
    if unknown:
        raise pytest.UsageError("listed as different but not collected (renamed upstream?): " + ", ".join(unknown))
    stock = modules_without_our_classes(items)
    if stock:
        raise pytest.UsageError("the class swap did not reach: " + ", ".join(stock))
    for item in items:
        if differences.get(item.nodeid, "").startswith(DIFFERS):
            item.add_marker(pytest.mark.xfail(strict=True, reason=differences[item.nodeid]))
    deselected = [item for item in items if differences.get(item.nodeid, "").startswith(NOT_RUN)]
    items[:] = [item for item in items if item not in deselected]
    config.hook.pytest_deselected(items=deselected)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The test modules are imported: RQ's queue module gets its own `Queue` global back."""
    setattr(rq.queue, "Queue", Queue)  # noqa: B010  # mypy refuses an assignment to a class name


def pytest_report_header(config: pytest.Config) -> str:
    names = ", ".join(f"rq.{name} = {cls.__module__}.{cls.__qualname__}" for name, cls in stand_ins().items())
    return f"rq {rq.__version__} upstream tests with {names}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    differences = config.stash[_differences]
    terminalreporter.section(f"{len(differences)} upstream tests deliberately different")
    for test_id, why in differences.items():
        terminalreporter.write_line(f"{test_id}  # {why}")


_differences = pytest.StashKey[dict[str, str]]()
