"""A bounded HTTP/1.1 keep-alive load generator, used by the benchmark only where `wrk` is missing.

`python -m bench.loadgen URL --connections 32 --seconds 8 [--body JSON]` prints, like the benchmark's
wrk script, one line: `RESULT requests duration_us p50_us p99_us errors`. It runs on the same cores
as the server, so its figures are lower than wrk's.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0


def request_bytes(url: str, body: str | None, api_key: str | None) -> bytes:
    parts = urlsplit(url)
    method = "POST" if body is not None else "GET"
    head = f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
    head += f"X-API-Key: {api_key}\r\n" if api_key else ""
    if body is None:
        return f"{head}\r\n".encode()
    data = body.encode()
    return f"{head}Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response with a Content-Length body; return its status code."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    length = next((int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), 0)
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def connection(url: str, request: bytes, deadline: float, tally: Tally) -> None:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            status = await read_response(reader)
            tally.latencies.append(time.perf_counter() - started)
            tally.errors += status >= 400
    finally:
        writer.close()


async def load(url: str, request: bytes, connections: int, seconds: float) -> tuple[Tally, float]:
    tally, started = Tally(), time.perf_counter()
    clients = [connection(url, request, started + seconds, tally) for _ in range(connections)]
    await asyncio.wait_for(asyncio.gather(*clients), seconds + 30)
    return tally, time.perf_counter() - started


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--body", help="JSON to POST; GET without it")
    parser.add_argument("--api-key", help="sent as X-API-Key")
    args = parser.parse_args()
    request = request_bytes(args.url, args.body, args.api_key)
    tally, elapsed = asyncio.run(load(args.url, request, args.connections, args.seconds))
    ordered = sorted(tally.latencies)
    figures = (len(ordered), elapsed * 1e6, percentile(ordered, 0.5) * 1e6, percentile(ordered, 0.99) * 1e6)
    print("RESULT", *(round(value) for value in figures), tally.errors, flush=True)


if __name__ == "__main__":
    main()
