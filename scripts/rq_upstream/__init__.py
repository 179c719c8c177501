"""RQ's own test suite run against the project's worker and queue classes (`scripts/rq-upstream.sh`)."""
