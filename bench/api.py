"""HTTP measurements: load at a fixed number of connections (wrk, else `bench.loadgen`), and batch enqueue."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import urlopen

from bench.stack import API_KEY

EMAIL = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}
REPORT_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end
"""
BATCH_ITEMS: dict[str, dict[str, Any]] = {"/send-email/batch": EMAIL, "/jobs/batch": {"task": "noop", "kwargs": {}}}
"""Batch endpoints the benchmark knows how to fill, if the API has one."""


@dataclass(frozen=True)
class Load:
    per_second: float
    p50_ms: float
    p99_ms: float
    errors: int


def load_generator() -> str:
    return "wrk (1 thread)" if shutil.which("wrk") else "bench.loadgen (asyncio, raw sockets; wrk not installed)"


def wrk_script(workdir: Path, body: dict[str, str] | None) -> Path:
    script = workdir / ("post.lua" if body else "get.lua")
    post = f'wrk.method = "POST"\nwrk.body = [[{json.dumps(body)}]]\nwrk.headers["Content-Type"] = "application/json"\n'
    script.write_text(f'wrk.headers["X-API-Key"] = "{API_KEY}"\n' + (post if body else "") + REPORT_LUA)
    return script


def run_load(workdir: Path, url: str, body: dict[str, str] | None, seconds: float, connections: int = 32) -> Load:
    """`connections` keep-alive clients as fast as they can for `seconds`: requests/s, p50, p99, errors."""
    if shutil.which("wrk"):
        script = wrk_script(workdir, body)
        command = ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "10s", "-s", str(script), url]
    else:
        command = [sys.executable, "-m", "bench.loadgen", url, f"--connections={connections}", f"--seconds={seconds}"]
        command += [f"--api-key={API_KEY}"]
        command += [f"--body={json.dumps(body)}"] if body else []
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    requests, duration_us, p50_us, p99_us, errors = (int(word) for word in line.split()[1:])
    return Load(requests / duration_us * 1e6, p50_us / 1000, p99_us / 1000, errors)


@dataclass(frozen=True)
class Batch:
    path: str
    wrapper: str | None
    """Property holding the list, or None when the body is the list itself."""
    max_items: int


def find_batch(api_url: str) -> Batch | str:
    """A batch endpoint from the API's OpenAPI schema, or why there is none to measure."""
    with urlopen(f"{api_url}/openapi.json", timeout=10) as answer:
        schema = json.load(answer)
    for path in BATCH_ITEMS:
        operation = schema["paths"].get(path, {}).get("post")
        if operation:
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            return _batch_shape(schema, path, _resolve(schema, body))
    return f"no batch endpoint in the API ({' or '.join(BATCH_ITEMS)} absent from /openapi.json)"


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rpartition("/")[2]]
    return node


def _batch_shape(schema: dict[str, Any], path: str, body: dict[str, Any]) -> Batch | str:
    if body.get("type") == "array":
        return Batch(path, None, int(body.get("maxItems", 1000)))
    properties = {name: _resolve(schema, value) for name, value in body.get("properties", {}).items()}
    lists = [name for name, value in properties.items() if value.get("type") == "array"]
    if len(lists) != 1:
        return f"{path} found, but its body is neither a list nor an object with one list"
    return Batch(path, lists[0], int(properties[lists[0]].get("maxItems", 1000)))


def post_batches(api_url: str, batch: Batch, size: int, count: int) -> float:
    """POST `count` batches of `size` items over one keep-alive connection; jobs accepted per second."""
    items = [BATCH_ITEMS[batch.path]] * size
    body = json.dumps(items if batch.wrapper is None else {batch.wrapper: items})
    parts = urlsplit(api_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    started = time.perf_counter()
    for _ in range(count):
        connection.request("POST", batch.path, body, {"Content-Type": "application/json", "X-API-Key": API_KEY})
        answer = connection.getresponse()
        text = answer.read()
        if answer.status >= 300:
            raise RuntimeError(f"POST {batch.path}: {answer.status} {text[:300]!r}")
    elapsed = time.perf_counter() - started
    connection.close()
    return size * count / elapsed
