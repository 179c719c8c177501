"""Herald: the job and notification service.

Sub-packages, in the direction of their imports (each may import those above it, never below):

- `infra`: Redis connections (plain or Sentinel, sync and asyncio), key names, logs, metrics, the supervisor
  of a lone worker process (standard library only: it runs without importing `herald`);
- `rq_seam`: every subclass of an RQ or rq-scheduler class and every private name of RQ or redis-py;
- `jobs`: the job service (enqueue, schedule, cancel, requeue, views), retry policy, capacity, sent-once
  markers, periodic jobs;
- `notify`: notifications, delivery records, preferences, digests, rendering, and `channels/`;
- `api`: the HTTP edge's parts (middleware, error mapping, idempotency, dashboard, MCP, inbox routes).

The entry points stay at the top of the repository: `app.py`, `worker.py`, `scheduler.py`, `tasks.py`,
`rqconfig.py`, `settings.py`.
"""

from herald.rq_seam import legacy_paths

legacy_paths.install()
