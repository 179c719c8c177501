"""Benchmark of the service: `python -m bench [--quick]` (a measurement, not a test).

Starts its own Valkey, SMTP sink (in this process), API (the run command's uvicorn line, production
settings) and workers on free loopback ports; measures each figure several times beside a baseline
taken in the same run; prints one table of medians with min..max and ratios, and whether each target
is met; stops all it started. The upper time bounds the tests leave out (a delayed job's lateness, the
503 of a killed or hung Redis, a webhook's timeout) are targets here, judged on the worst run.
Every wait is capped, so a slow worker shortens a measurement (noted) instead of hanging the run:
about 3.5 minutes in all on 2 cores, 1.5 with `--quick` (2.3 on a machine loaded to 9).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import api, jobs, outage, peer_bench
from bench.report import Row, table
from bench.stack import Stack, api_command, http_ok, rss_mib, running
from herald.mailsink import free_port
from tests.helpers import stop_process, wait_until

BASE = ("rq Worker", "plain")
"""The baseline of the worker figures: RQ's stock forking worker on jobs whose module imports nothing."""
DRAINS: tuple[tuple[str, str], ...] = (BASE, ("worker.py", "project"), ("rq Worker", "project"))
DRAINS += (("rq SimpleWorker", "plain"), ("rq SimpleWorker", "project"))
LATENCIES: tuple[tuple[str, str], ...] = (BASE, ("worker.py", "project"), ("rq SimpleWorker", "plain"))
STARTS = ("rq Worker", "worker.py", "rq SimpleWorker")


@dataclass(frozen=True)
class Config:
    runs: int
    api_seconds: int
    bulk_jobs: int
    drain_jobs: int
    drain_cap: float
    latency_jobs: int
    latency_cap: float
    emails: int
    emails_cap: float
    scheduled_jobs: int
    peer_jobs: int = 1000
    peer_emails: int = 200
    peer_cap: float = 20.0
    peer_deliveries: int = 1000


FULL = Config(3, 8, 2000, 300, 5.0, 200, 5.0, 300, 8.0, 50)
QUICK = Config(
    2, 3, 1000, 100, 3.0, 50, 3.0, 100, 5.0, 20, peer_jobs=500, peer_emails=100, peer_cap=10.0, peer_deliveries=500
)


def make_rows(config: Config) -> dict[str, Row]:
    base, idle = "rq Worker, plain jobs", "rq Worker, idle"
    drain = f"{config.drain_jobs} no-op jobs, first start to last end"
    rows = {
        "api rate": Row("POST /send-email", "req/s", "GET /healthz (ceiling)", "≥0.8x"),
        "api p50": Row("POST /send-email p50", "ms", "GET /healthz p50"),
        "api p99": Row("POST /send-email p99", "ms", "GET /healthz p99", "≤50 ms"),
        "many": Row(f"queue.enqueue_many, pipelines of {jobs.CHUNK}", "jobs/s", "queue.enqueue loop"),
        "tasks": Row("enqueue.enqueue_task loop (project)", "jobs/s", "queue.enqueue loop"),
        "batch": Row(f"POST batch endpoint, {jobs.CHUNK} per request", "jobs/s", "queue.enqueue loop", "≥10,000"),
        "emails": Row(
            f"{config.emails} emails: API, Redis, worker.py, sink", "mails/s", "project no-op jobs, same N workers"
        ),
        "enqueued early": Row(f"enqueued - due, earliest of {config.scheduled_jobs}", "s", "", "≥0", worst=True),
        "enqueued late": Row("enqueued - due, latest", "s"),
        "start early": Row("start - due, earliest", "s", "", "≥0", worst=True),
        "start late": Row("start - due, latest", "s", "", "≤1 s", worst=True),
        "503 killed": Row("Redis killed: slowest 503 of /healthz, /send-email, /job", "s", "", "≤1.5 s", worst=True),
        "503 hung": Row("Redis hung (SIGSTOP): slowest 503, same requests", "s", "", "≤1.5 s", worst=True),
        "webhook timeout": Row(
            f"webhook, receiver 5x its {outage.WEBHOOK_TIMEOUT:g} s timeout: error after", "s", "", "≤2 s", worst=True
        ),
        "rss api": Row("API, after the load runs", "MiB", "minimal FastAPI app, same load"),
    }
    for kind, source in DRAINS:
        target = "≥4x" if kind == "worker.py" else ""
        rows[f"drain {kind} {source}"] = Row(f"{kind}, {source} jobs: {drain}", "jobs/s", base, target)
    for kind in STARTS:
        rows[f"start {kind}"] = Row(f"{kind} --burst, empty queues", "s", "rq Worker")
    for kind, source in LATENCIES:
        target = "≤5 ms" if kind == "worker.py" else ""
        rows[f"p50 {kind}"] = Row(f"{kind}, {source} jobs: p50", "ms", f"{base}: p50", target)
        rows[f"p99 {kind}"] = Row(f"{kind}, {source} jobs: p99", "ms", f"{base}: p99")
        rows[f"rss {kind}"] = Row(f"{kind}, idle", "MiB", idle)
    return rows | peer_bench.make_rows()


SECTIONS = {
    "1. API, 32 keep-alive connections": ("api rate", "api p50", "api p99"),
    "2. Bulk enqueue, from Python and through the API": ("many", "tasks", "batch"),
    "3. Worker throughput, one process": tuple(f"drain {kind} {source}" for kind, source in DRAINS)
    + tuple(f"start {kind}" for kind in STARTS),
    "3b. End to end, the run command's worker count": ("emails",),
    "4. Enqueue → start, sequential jobs, idle queue, one running worker": tuple(
        f"{figure} {kind}" for kind, _ in LATENCIES for figure in ("p50", "p99")
    ),
    "5. Scheduling, the run command's workers + scheduler.py (bench.scheduling.measure)": (
        "enqueued early",
        "enqueued late",
        "start early",
        "start late",
    ),
    "6. Memory, VmRSS": ("rss api", *(f"rss {kind}" for kind, _ in LATENCIES)),
    "7. Failures answered in time, each run's slowest (bench.outage)": ("503 killed", "503 hung", "webhook timeout"),
    "8. Peers and delivery capacity, same Valkey, same run (bench.peer_bench)": peer_bench.SECTION_KEYS,
    "9. Deliveries in flight, the same sink and receivers, same run (bench.peer_bench)": peer_bench.DELIVERY_KEYS,
}


ONLY: dict[str, tuple[str, ...]] = {
    "api": ("api rate", "api p50", "api p99", "rss api"),
    "peers": peer_bench.SECTION_KEYS,
    "deliveries": peer_bench.DELIVERY_KEYS,
}
"""`--only` choices: the rows each measures."""


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rotated(items: Sequence[Any], run: int) -> list[Any]:
    """Each run starts with the next item, so a slow spell of the machine does not hit one item only."""
    shift = run % len(items)
    return [*items[shift:], *items[:shift]]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


def add(row: Row, value: float, baseline: float | None = None) -> None:
    row.samples.append(value)
    if baseline is not None:
        row.baseline_samples.append(baseline)


def measure_api(stack: Stack, rows: dict[str, Row], config: Config, run: int) -> None:
    results = {}
    for path in rotated(("/healthz", "/send-email"), run):
        body = api.EMAIL if path == "/send-email" else None
        results[path] = api.run_load(stack.workdir, f"{stack.api_url}{path}", body, config.api_seconds)
    send, ceiling = results["/send-email"], results["/healthz"]
    add(rows["api rate"], send.per_second, ceiling.per_second)
    add(rows["api p50"], send.p50_ms, ceiling.p50_ms)
    add(rows["api p99"], send.p99_ms, ceiling.p99_ms)
    if send.errors or ceiling.errors:
        rows["api rate"].note += f"run {run + 1}: {send.errors} + {ceiling.errors} errors (send + ceiling). "
    add(rows["rss api"], rss_mib(stack.api.pid))
    stack.flush()


def minimal_app_rss(stack: Stack, seconds: int) -> float:
    """RSS of the smallest FastAPI app under the same uvicorn command, after the same kind of load."""
    port = free_port()
    process = stack.spawn("hello", [word.replace("app:app", "bench.hello:app") for word in api_command(port)])
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=30, what="minimal app")
    api.run_load(stack.workdir, f"http://127.0.0.1:{port}/healthz", None, seconds)
    rss = rss_mib(process.pid)
    stop_process(process)
    return rss


def measure_bulk(stack: Stack, rows: dict[str, Row], config: Config, batch: api.Batch | str) -> None:
    with stack.redis() as connection:
        loop = jobs.enqueue_loop(connection, config.bulk_jobs)
        add(rows["many"], jobs.enqueue_many(connection, config.bulk_jobs), loop)
    add(rows["tasks"], jobs.enqueue_tasks(config.bulk_jobs // 2), loop)
    if isinstance(batch, api.Batch):
        size = min(jobs.CHUNK, batch.max_items)
        add(rows["batch"], api.post_batches(stack.api_url, batch, size, max(1, config.bulk_jobs // size)), loop)
    stack.flush()


def measure_workers(stack: Stack, rows: dict[str, Row], config: Config, run: int) -> None:
    rates = {}
    for kind, source in rotated(DRAINS, run):
        drained = jobs.drain(stack, kind, source, config.drain_jobs, config.drain_cap)
        rates[kind, source] = drained.rate
        if drained.done < config.drain_jobs:
            rows[f"drain {kind} {source}"].note += f"run {run + 1}: {drained.done} done in {config.drain_cap:g} s. "
    for kind, source in DRAINS:
        add(rows[f"drain {kind} {source}"], rates[kind, source], rates[BASE])
    startups = {kind: jobs.drain(stack, kind, "plain", 0, 30).seconds for kind in rotated(STARTS, run)}
    for kind in STARTS:
        add(rows[f"start {kind}"], startups[kind], startups["rq Worker"])


def measure_latency(stack: Stack, rows: dict[str, Row], config: Config, run: int) -> None:
    delays, rss = {}, {}
    for kind, source in rotated(LATENCIES, run):
        delays[kind], rss[kind] = jobs.latency(stack, kind, source, config.latency_jobs, config.latency_cap)
        if len(delays[kind]) < config.latency_jobs:
            rows[f"p50 {kind}"].note += f"run {run + 1}: {len(delays[kind])} jobs in {config.latency_cap:g} s. "
    base = delays[BASE[0]]
    for kind, _ in LATENCIES:
        add(rows[f"p50 {kind}"], statistics.median(delays[kind]), statistics.median(base))
        add(rows[f"p99 {kind}"], p99(delays[kind]), p99(base))
        add(rows[f"rss {kind}"], rss[kind], rss[BASE[0]])


def measure_emails(stack: Stack, rows: dict[str, Row], config: Config) -> None:
    """The run command's number of `worker.py` processes, running: emails through the API, and no-op
    jobs enqueued from Python through the same workers (the baseline), in turns."""
    from settings import get_settings

    count, row = get_settings().worker_count, rows["emails"]
    pool = stack.worker_pool()
    stack.wait_for_workers(count)
    for run in range(config.runs):
        progress(f"end to end, run {run + 1}/{config.runs}")
        for kind in rotated(("emails", "noop"), run):
            if kind == "noop":
                row.baseline_samples.append(jobs.through_workers(stack, config.emails, config.emails_cap).rate)
            else:
                sent = jobs.emails(stack, config.emails, config.emails_cap)
                row.samples.append(sent.rate)
                row.note += (
                    f"run {run + 1}: {sent.done} in {config.emails_cap:g} s. " if sent.done < config.emails else ""
                )
            jobs.settle(stack)
    row.name, row.baseline = row.name.replace("worker.py", f"{count} worker.py"), f"no-op jobs, same {count} workers"
    stop_process(pool)
    stack.flush()


def measure_scheduling(stack: Stack, rows: dict[str, Row], config: Config) -> None:
    """`bench.scheduling.measure`: delayed jobs 2-4 s ahead; the run command's workers and scheduler.py."""
    from bench.scheduling import measure
    from settings import get_settings

    count = get_settings().worker_count
    processes = [stack.worker_pool(), stack.spawn("scheduler", [sys.executable, "scheduler.py"])]
    stack.wait_for_workers(count)
    for run in range(config.runs):
        progress(f"scheduling, run {run + 1}/{config.runs}")
        try:
            enqueued, started = measure(config.scheduled_jobs)
        except AssertionError as exc:  # a job not done 30 s after the one before it
            rows["start late"].note += f"run {run + 1}: {exc}. "
            continue
        for key, values in (("enqueued", enqueued), ("start", started)):
            add(rows[f"{key} early"], values[0])
            add(rows[f"{key} late"], values[-1])
    for process in processes:
        stop_process(process)
    stack.flush()


def measure_outage(stack: Stack, rows: dict[str, Row], config: Config) -> None:
    """`bench.outage`: the API on a Valkey of its own, killed and hung; a webhook slower than its timeout."""
    progress("Redis killed and hung; a slow webhook")
    result = outage.redis_outage(config.runs, stack.workdir)
    rows["503 killed"].samples += result.killed
    rows["503 hung"].samples += result.stopped
    rows["503 hung"].note += "".join(f"not a 503: {error}. " for error in result.errors)
    rows["webhook timeout"].samples += outage.webhook_timeout(config.runs)
    if len(rows["webhook timeout"].samples) < config.runs:
        rows["webhook timeout"].note += "a delivery did not end with a transient error. "


def installed(module: str) -> str:
    return "installed" if importlib.util.find_spec(module) else "NOT installed"


def describe(stack: Stack, config: Config) -> list[str]:
    with stack.redis() as connection:
        server = connection.info("server")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())  # fmt: skip
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("rq", "fastapi", "uvicorn", "redis"))
    command = " ".join(api_command(8000)[1:]).replace(" --port 8000", "")
    return [
        f"machine: {os.cpu_count()} cores ({cpu}), load average {os.getloadavg()[0]:.2f} at start; loopback only",
        f"python {platform.python_version()}, {versions}, valkey {server.get('valkey_version', '?')} (AOF everysec)",
        f"API: {command} (the run command's), ENVIRONMENT=production;"
        f" uvloop {installed('uvloop')}, httptools {installed('httptools')}",
        f"load generator: {api.load_generator()}, 32 connections, {config.api_seconds} s per run",
        f"{config.runs} runs of each measurement: median and min..max over runs; jobs: {jobs.SOURCES_DOC}",
    ]


def warm_up_api(stack: Stack, config: Config, rows: dict[str, Row]) -> None:
    """One second of each load, not counted; then the memory baseline, the minimal app."""
    for path in ("/healthz", "/send-email"):
        api.run_load(stack.workdir, f"{stack.api_url}{path}", api.EMAIL if path != "/healthz" else None, 1)
    rows["rss api"].baseline_samples.append(minimal_app_rss(stack, config.api_seconds))
    stack.flush()


def run_api(stack: Stack, config: Config, rows: dict[str, Row]) -> None:
    """`--only api`: section 1 and the API's memory, without the rest."""
    warm_up_api(stack, config, rows)
    for run in range(config.runs):
        progress(f"run {run + 1}/{config.runs}: API")
        measure_api(stack, rows, config, run)


def run_all(stack: Stack, config: Config, rows: dict[str, Row]) -> None:
    batch = api.find_batch(stack.api_url)
    if isinstance(batch, str):
        rows["batch"].note = batch
    warm_up_api(stack, config, rows)
    for run in range(config.runs):
        progress(f"run {run + 1}/{config.runs}: API, bulk enqueue, workers, latency")
        measure_api(stack, rows, config, run)
        measure_bulk(stack, rows, config, batch)
        measure_workers(stack, rows, config, run)
        measure_latency(stack, rows, config, run)
    measure_emails(stack, rows, config)
    measure_scheduling(stack, rows, config)
    measure_outage(stack, rows, config)
    measure_peers(stack, rows, config)
    measure_deliveries(stack, rows, config)


def measure_peers(stack: Stack, rows: dict[str, Row], config: Config) -> None:
    progress(f"peers: {config.runs} runs of no-op jobs and slow-SMTP emails on each set-up")
    peer_bench.measure(stack, rows, config.runs, config.peer_jobs, config.peer_emails, config.peer_cap)


def measure_deliveries(stack: Stack, rows: dict[str, Row], config: Config) -> None:
    progress(f"deliveries: {config.runs} runs of mixed email and webhook deliveries on each set-up")
    peer_bench.measure_deliveries(stack, rows, config.runs, config.peer_deliveries, config.peer_cap)


def render(header: list[str], rows: dict[str, Row], seconds: float, only: str | None = None) -> str:
    chosen = {title: [key for key in keys if only is None or key in ONLY[only]] for title, keys in SECTIONS.items()}
    sections = {title: [rows[key] for key in keys] for title, keys in chosen.items() if keys}
    footer = "ratio = median / baseline's median; met: the target against the median (sections 5 and 7:"
    footer += f" the worst run); total {seconds:.0f} s"
    return "\n".join([*header, "", table(sections), "", footer])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 runs, shorter loads and caps")
    parser.add_argument("--only", choices=sorted(ONLY), help="measure only: api (1, memory), peers (8), deliveries (9)")
    options = parser.parse_args(argv)
    config = QUICK if options.quick else FULL
    rows, started = make_rows(config), time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    with running(workdir) as stack:
        progress(f"Valkey, SMTP sink and API up; logs in {workdir} (removed after a successful run)")
        header = describe(stack, config)
        if options.only == "peers":
            measure_peers(stack, rows, config)
        elif options.only == "deliveries":
            measure_deliveries(stack, rows, config)
        elif options.only == "api":
            run_api(stack, config, rows)
        else:
            run_all(stack, config, rows)
    print(render(header, rows, time.perf_counter() - started, options.only), flush=True)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
