"""RQ's timestamps parsed with `datetime.fromisoformat` instead of `strptime`.

RQ writes every timestamp of a job with `utcformat` (`2026-12-02T05:03:51.123456Z`) and reads each back
with `rq.utils.utcparse`, which calls `datetime.strptime`: its pure-Python parser, with a locale lookup,
was the largest single cost of restoring a claimed job. `fromisoformat` (C, and reading the trailing `Z`
since Python 3.11) gives the same aware UTC datetime for both formats RQ reads; `install` puts it in
place of `rq.utils.utcparse`, which `rq.utils.str_to_date` (RQ's reader of job, worker and execution
hashes) looks up at each call.
"""

from __future__ import annotations

from datetime import UTC, datetime

import rq.utils

RQ_UTCPARSE = rq.utils.utcparse
RQ_SHAPES = (len("2026-12-02T05:03:51.123456Z"), len("2026-12-02T05:03:51Z"))
"""The lengths of the two formats RQ reads: with microseconds (what it writes) and without (older jobs)."""


def utcparse(string: str) -> datetime:
    """RQ's `utcparse`: an aware UTC datetime. A string not shaped as RQ writes them goes to RQ's own,
    which decides (and raises `ValueError` as before)."""
    if len(string) not in RQ_SHAPES or string[10] != "T" or string[-1] != "Z":
        return RQ_UTCPARSE(string)
    return datetime.fromisoformat(string).replace(tzinfo=UTC)


def install() -> None:
    rq.utils.utcparse = utcparse
