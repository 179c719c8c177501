"""The one seam to RQ: every subclass of an RQ or rq-scheduler class, every private name of RQ,
rq-scheduler or redis-py, and the Lua scripts that read RQ's keys live in this package.

It was written against the versions in `SUPPORTED`; at import (that is, when any process of the
service starts: `herald` imports this package first) the installed versions are checked, and a
process refuses to start under others, instead of failing at run time in an override that no longer
matches RQ. `scripts/check_private_names.py` (run by `test.sh`) keeps private names out of the rest.

What the seam changes in RQ's behaviour, module by module:
- `recovery`: queues claim a job atomically as it is popped (`ClaimingQueue`), so a job whose worker is
  killed is found and retried within seconds (job heartbeats with a grace), instead of after RQ's
  maintenance pass; workers keep leaner bookkeeping (a successful job's end, the check that the job is still
  this worker's, and the release of its destination slot with RQ's own release script, are one script; a
  job's metrics ride with it); idle workers wake on keyspace events.
- `starts`: a worker that runs its jobs in its own process pops and starts a job in one script, and one
  that runs one job at a time pops and starts the next job in its last job's end script (one round trip
  per job); a job so popped by a worker that then stops goes back to the front of its queue.
- `threaded`: a `SimpleWorker` that runs WORKER_THREADS jobs at once, in threads made once; their timeouts
  kept by one watchdog thread per process (`WatchdogDeathPenalty`: RQ's `TimerDeathPenalty` starts a timer
  thread per job and per callback); a job's end pops the next for the same thread (short jobs are not handed
  between threads), the main thread keeping RQ's loop duties meanwhile.
- `pool`: RQ's `WorkerPool` runs our workers, and in burst mode also replaces recycled or crashed processes.
- `schedulers`: rq-scheduler compares due times to the fraction of a second (never early); RQ's cron
  scheduler claims each run in Redis, so several scheduler processes enqueue it once.
- `limits`: RQ's rate-limited enqueue written into the caller's transaction (RQ refuses it in a pipeline);
  a slot released with the job's own concurrency (RQ reads the key's from Redis); the sweep runs RQ's
  rate-limit cleanup.
- `enqueue`, `replay`: RQ's enqueue steps for batches, and the asyncio replay of RQ's pipeline writes.
- `legacy_paths`: dotted paths named by jobs already in Redis stay importable.
- `dates`: `rq.utils.utcparse` (how RQ reads every timestamp of its hashes) parses RQ's own format with
  `datetime.fromisoformat` instead of `strptime`; any other string still goes to RQ's.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from importlib import metadata

SUPPORTED: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "rq": ((3, 0, 0), (3, 1)),
    "rq-scheduler": ((0, 14, 0), (0, 15)),
}
"""Distribution -> (lowest version, first version not supported): the range the seam was written for."""


class UnsupportedVersionError(RuntimeError):
    """An installed RQ or rq-scheduler the seam was not written for."""


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "3.0.0" -> (3, 0, 0), "3.1.0rc1" -> (3, 1, 0)."""
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in version.split(".")[:3])  # type: ignore[union-attr]


def _label(release: tuple[int, ...]) -> str:
    return ".".join(map(str, release))


def problems(installed: Mapping[str, str]) -> list[str]:
    """One sentence per distribution outside its supported range (or missing)."""
    found = []
    for name, (lowest, beyond) in SUPPORTED.items():
        version = installed.get(name)
        if version is None:
            found.append(f"{name} is not installed; herald needs {name}>={_label(lowest)},<{_label(beyond)}")
        elif not lowest <= _release(version) < beyond:
            found.append(
                f"{name} {version} is installed, but herald's RQ seam (herald/rq_seam) was written for "
                f"{name}>={_label(lowest)},<{_label(beyond)}: install that (requirements.txt pins it), "
                "or check each override in herald/rq_seam against the new version and widen SUPPORTED"
            )
    return found


def installed_versions() -> dict[str, str]:
    versions = {}
    for name in SUPPORTED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def check_versions(installed: Mapping[str, str] | None = None) -> None:
    """Raise `UnsupportedVersionError` naming every distribution outside its supported range."""
    found = problems(installed_versions() if installed is None else installed)
    if found:
        raise UnsupportedVersionError("; ".join(found))


check_versions()
