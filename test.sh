#!/usr/bin/env bash
# Set up and run every check and the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh requirements-dev.txt
source scripts/test-tools.sh
echo "== ruff" && ruff check . && ruff format --check .
echo "== mypy" && mypy .
echo "== private names of rq, rq_scheduler, redis outside herald/rq_seam" && python scripts/check_private_names.py
echo "== pytest" && pytest "$@"
echo "== rq upstream" && scripts/rq-upstream.sh
echo "== rq upstream, the threaded worker (WORKER_THREADS > 1) as rq.SimpleWorker" && RQ_UPSTREAM_SIMPLE_WORKER=threaded scripts/rq-upstream.sh
