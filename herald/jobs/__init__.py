"""The job service: `enqueue` (tasks, email batches), `states` (cancel, requeue, complete), `views`
(jobs and pages of them), `retries` (backoff), `backpressure` (capacity), `store` (Redis, queues,
transactions), `queues` (RQ's callbacks and every job's options), `sent_once`, periodic jobs (`cron`)."""
