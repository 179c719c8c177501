"""The benchmark's peers: the same no-op jobs and emails on dramatiq, huey and celery.

These modules run only in the benchmark's own environment (`var/bench-peers`, made by
`bench.peer_bench.ensure_environment`), never in the service's: the peers are no runtime dependency.
Each task module reads `BENCH_REDIS_URL` and `BENCH_SMTP_PORT` from the environment.
"""
