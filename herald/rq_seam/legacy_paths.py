"""Dotted paths named by jobs already in Redis, kept importable after the move into `herald`.

RQ stores a job's function and callbacks by dotted path (`Job.func_name`, `success_callback_name`,
`failure_callback_name`) and imports them by that path when a worker runs the job. Jobs written before
the `herald` package name `tasks.*` (still a top-level module) and the callbacks below, whose module
is gone from the top level. A finder placed last on `sys.meta_path` answers an import of such an old
module with a module holding just those names, taken from their new home; any real module of that
name on `sys.path` would be found first. Remove an entry once no job naming it can still be in Redis
(`FAILURE_TTL_SECONDS` after the last release that wrote it).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

LEGACY_PATHS = {
    "queues.on_job_failure": "herald.jobs.queues.on_job_failure",
    "queues.on_job_success": "herald.jobs.queues.on_job_success",
}
"""Old dotted path -> where the object lives now."""


class LegacyPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module of `LEGACY_PATHS` as a module holding only its old names."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not any(old.rpartition(".")[0] == fullname for old in LEGACY_PATHS):
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def exec_module(self, module: ModuleType) -> None:
        module.__doc__ = f"Old dotted paths of `{module.__name__}`, kept for jobs already in Redis."
        for old, new in LEGACY_PATHS.items():
            old_module, _, name = old.rpartition(".")
            if old_module == module.__name__:
                new_module, _, new_name = new.rpartition(".")
                setattr(module, name, getattr(importlib.import_module(new_module), new_name))


def install() -> None:
    """Put the finder last on `sys.meta_path`, once per process."""
    if not any(isinstance(finder, LegacyPathFinder) for finder in sys.meta_path):
        sys.meta_path.append(LegacyPathFinder())
