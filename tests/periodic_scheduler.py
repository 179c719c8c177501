"""`scheduler.py` with the test-only periodic jobs declared as well: `python -m tests.periodic_scheduler`."""

from __future__ import annotations

import scheduler
from herald.jobs import cron
from tests.periodic_jobs import TEST_JOBS

if __name__ == "__main__":
    for job in TEST_JOBS:
        cron.register(job)
    scheduler.main()
