"""A real HTTP server that records webhook requests, and the receiver side of Standard Webhooks.

`Receiver` listens on 127.0.0.1 (or another loopback address given) on a free port in a thread,
records every request, answers 200, or the status queued with `fail_next`, after an optional
`delay`, and counts how many requests it holds at once (`max_in_flight`). `verify_signature` checks a request
as a receiver would, written from the specification rather than from `channels.webhook`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

TIMESTAMP_TOLERANCE_SECONDS = 5 * 60


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    """Header names in lower case."""
    body: bytes
    received_at: float
    """time.time() when the request was read."""


Answer = bytes | Callable[[ReceivedRequest], bytes]
"""A response body, or a function of the request that makes one (to echo it back)."""


@dataclass(frozen=True)
class _Failure:
    status: int
    headers: Mapping[str, str]
    body: Answer


class Receiver:
    """Records requests; `fail_next`, `delay` and `wait_for` steer and observe it from a test."""

    def __init__(self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self._condition = threading.Condition()
        self._requests: list[ReceivedRequest] = []
        self._failures: list[_Failure] = []
        self._released = threading.Event()
        self.delay = 0.0
        """Seconds to wait before answering; `stop()` cuts the wait short."""
        self.in_flight = 0
        """Requests being held (read, not yet answered) right now."""
        self.max_in_flight = 0
        """The most requests held at once since the start."""
        self._server = _Server((host, 0), _Handler)
        self._server.receiver = self
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._tls = tls is not None
        self._thread = threading.Thread(target=self._serve, name="webhook-receiver", daemon=True)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def _serve(self) -> None:
        self._server.serve_forever(poll_interval=0.02)  # a short poll makes stop() quick

    def stop(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"{'https' if self._tls else 'http'}://{host}:{self.port}"

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._condition:
            return list(self._requests)

    def fail_next(self, count: int, status: int, headers: Mapping[str, str] | None = None, body: Answer = b"") -> None:
        """Answer the next `count` requests with `status` (and these headers and body) instead of 200."""
        with self._condition:
            self._failures.extend([_Failure(status, dict(headers or {}), body)] * count)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedRequest]:
        """The requests once at least `count` have arrived; fail the test after `timeout` s."""
        with self._condition:
            if not self._condition.wait_for(lambda: len(self._requests) >= count, timeout):
                raise AssertionError(f"receiver got {len(self._requests)} requests, expected {count}")
            return list(self._requests)

    def _record(self, request: ReceivedRequest) -> _Failure | None:
        with self._condition:
            self._requests.append(request)
            self._condition.notify_all()
            return self._failures.pop(0) if self._failures else None

    def _hold(self) -> None:
        with self._condition:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                self._released.wait(self.delay)
        finally:
            with self._condition:
                self.in_flight -= 1


class _Server(ThreadingHTTPServer):
    receiver: Receiver
    daemon_threads = True

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet when a client hangs up first (the timeout test does)."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        request = ReceivedRequest(
            method=self.command,
            path=self.path,
            headers={name.lower(): value for name, value in self.headers.items()},
            body=self.rfile.read(length),
            received_at=time.time(),
        )
        receiver = self.server.receiver
        failure = receiver._record(request)
        receiver._hold()
        status, headers, body = (200, {}, b"ok") if failure is None else (failure.status, failure.headers, failure.body)
        content = body(request) if callable(body) else body
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output clean."""


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> bool:
    """Whether a request is authentic as Standard Webhooks defines it, within 5 minutes of `now`."""
    headers = {name.lower(): value for name, value in headers.items()}
    try:
        webhook_id = headers["webhook-id"]
        timestamp = int(headers["webhook-timestamp"])
        signatures = headers["webhook-signature"].split(" ")
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > TIMESTAMP_TOLERANCE_SECONDS:
        return False
    content = webhook_id.encode() + b"." + str(timestamp).encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    for signature in signatures:
        version, _, value = signature.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A started `Receiver`, stopped after the test."""
    server = Receiver().start()
    yield server
    server.stop()
