"""The key names of `herald.infra.keys` are the ones the service wrote before it: data already in
Redis is found after an upgrade."""

from __future__ import annotations

from datetime import UTC, datetime

from herald.infra import keys
from herald.rq_seam.schedulers import run_key


def test_every_key_keeps_its_name() -> None:
    assert keys.PREFIX == ""
    assert (keys.notification("n1"), keys.delivery("d1"), keys.contact("u1")) == (
        "notification:n1",
        "delivery:d1",
        "user:u1",
    )
    assert (keys.preferences("u1"), keys.inbox("u1")) == ("preferences:u1", "inbox:{u1}")
    assert keys.digest_pointer("u1", "email", "k") == "digest:open:u1:email:k"
    assert (keys.digest("g1"), keys.digest_items("g1")) == ("digest:g1", "digest:g1:items")
    assert (keys.idempotency("POST /jobs", "k"), keys.sent("j1")) == ("idempotency:POST /jobs:k", "sent:j1")
    assert run_key("daily", datetime(2026, 1, 1, tzinfo=UTC)) == "periodic:run:daily:2026-01-01T00:00:00+00:00"
    assert (keys.webhook_limit("example.com"), keys.smtp_limit("mail", 25)) == ("webhook:example.com", "smtp:mail:25")
    assert (keys.METRICS_PREFIX, keys.RECOVERY_CLAIMS, keys.REPLICATION_FENCE) == (
        "metrics:",
        "recovery:claims",
        "replication:fence",
    )
    assert (keys.DELAYED_JOBS, keys.WORKERS) == ("rq:scheduler:scheduled_jobs", "rq:workers")
