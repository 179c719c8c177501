"""What every peer's tasks share: where Redis, the SMTP sink and the webhook receivers are; sending
one email as the service does (one SMTP session kept per thread, so that a peer pays no connection
per message); POSTing one webhook as the service does (`http.client`, a connection per request)."""

from __future__ import annotations

import http.client
import json
import os
import smtplib
import threading
from email.message import EmailMessage
from urllib.parse import urlsplit

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SMTP_PORT = int(os.environ.get("BENCH_SMTP_PORT", "25"))
WEBHOOK_URLS = [url for url in os.environ.get("BENCH_WEBHOOK_URLS", "").split(",") if url]
"""The receivers of the mixed deliveries, one per host."""
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


def deliver(number: int) -> None:
    """Delivery `number` of the mixed benchmark: an email, or a webhook to one of the receivers, in turn."""
    turn = number % (len(WEBHOOK_URLS) + 1)
    if turn == 0:
        send_email(number)
    else:
        post_webhook(WEBHOOK_URLS[turn - 1], number)


def post_webhook(url: str, number: int) -> None:
    """POST a small JSON notification; anything but 2xx is an error."""
    parts = urlsplit(url)
    body = json.dumps({"type": "notification", "data": {"delivery_id": str(number), "title": "Mail"}}).encode()
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        connection.request("POST", parts.path or "/", body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        response.read()
        if not 200 <= response.status < 300:
            raise RuntimeError(f"webhook answered {response.status}")
    finally:
        connection.close()
