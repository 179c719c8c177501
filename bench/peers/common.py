"""What every peer's tasks share: where Redis and the SMTP sink are, and sending one email as the
service does (one SMTP session kept per thread, so that a peer pays no connection per message)."""

from __future__ import annotations

import os
import smtplib
import threading
from email.message import EmailMessage

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SMTP_PORT = int(os.environ.get("BENCH_SMTP_PORT", "25"))
QUEUE = "bench"
"""The queue name each peer uses (celery's default queue is named `celery`: set to this one too)."""

_local = threading.local()


def send_email(number: int) -> None:
    """Send one small email to the sink, on this thread's SMTP session."""
    smtp = getattr(_local, "smtp", None)
    if smtp is None:
        smtp = _local.smtp = smtplib.SMTP("127.0.0.1", SMTP_PORT, timeout=30)
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "bench@localhost", f"user{number}@example.com", "Mail"
    message.set_content("Hello")
    try:
        smtp.send_message(message)
    except (OSError, smtplib.SMTPException):
        _local.smtp = None
        smtp.close()
        raise
