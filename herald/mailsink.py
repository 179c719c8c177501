"""A local SMTP server that keeps every message: the run command's mail sink, and the tests'.

`python -m herald.mailsink --port 8025 --maildir var/mail` prints one line per message and saves it
as an `.eml` file. Tests use `MailSink` directly, and can make it refuse the next messages.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import threading
import time
from collections import deque
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class MailSink:
    """aiosmtpd handler that records messages and can answer the next ones with an error."""

    def __init__(self, maildir: Path | None = None, echo: bool = False) -> None:
        self.messages: list[EmailMessage] = []
        self.peers: list[object] = []
        """The client address of each message's SMTP session, in order."""
        self.maildir = maildir
        self.echo = echo
        self._replies: deque[str] = deque()
        self._received = threading.Condition()
        self.hold = 0.0
        """Seconds each message is held before it is answered, as a slow server would."""
        self.in_flight = 0
        """Messages being held right now (sessions run concurrently on the sink's event loop)."""
        self.max_in_flight = 0
        """The most messages held at once since the start."""

    def fail_next(self, count: int, reply: str = "451 4.3.0 Try again later") -> None:
        self._replies.extend([reply] * count)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold:
                await asyncio.sleep(self.hold)
            return self._accept(session, envelope)
        finally:
            self.in_flight -= 1

    def _accept(self, session: Session, envelope: Envelope) -> str:
        if self._replies:
            return self._replies.popleft()
        raw = envelope.original_content or b""
        message = message_from_bytes(raw, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.peers.append(session.peer)
        self._keep(message, raw)
        return "250 Message accepted for delivery"

    def _keep(self, message: EmailMessage, raw: bytes) -> None:
        if self.maildir:
            self.maildir.mkdir(parents=True, exist_ok=True)
            (self.maildir / f"{time.time_ns()}.eml").write_bytes(raw)
        if self.echo:
            print(f"mail to {message['To']}: {message['Subject']!r}", flush=True)
        with self._received:
            self.messages.append(message)
            self._received.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[EmailMessage]:
        """Wait until `count` messages have arrived; raise `TimeoutError` otherwise."""
        with self._received:
            if not self._received.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(f"{len(self.messages)} of {count} messages arrived in {timeout} s")
            return list(self.messages)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def start(sink: MailSink, host: str = "127.0.0.1", port: int | None = None) -> Controller:
    """Serve `sink` on a thread, on a free port unless one is given (see `controller.port`)."""
    controller = Controller(sink, hostname=host, port=port or free_port(host), ready_timeout=5)
    controller.start()
    return controller


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Local SMTP sink that keeps every message.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--maildir", type=Path, default=Path("var/mail"))
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to hold each message (a slow server)")
    args = parser.parse_args(argv)
    sink = MailSink(args.maildir, echo=True)
    sink.hold = args.hold
    controller = start(sink, args.host, args.port)
    print(f"SMTP sink on {args.host}:{args.port}, saving mail to {args.maildir}/", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
