"""The validation patterns of ids and names, defined once: request schemas, path parameters, MCP tools
and the workers all check against these."""

from __future__ import annotations

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
"""RQ's own ids (uuid4 hex) and rq-scheduler's (uuid4 with dashes) both match."""
ID_PATTERN = r"^[A-Za-z0-9_.@-]{1,128}$"
"""User ids, entity ids and correlation ids: plain tokens, safe in Redis keys and log lines."""
TOPIC_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Topics and digest keys."""
TEMPLATE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
"""A template's folder name: safe in a file path."""
PERIODIC_JOB_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
NOTIFICATION_ID_PATTERN = r"^[0-9a-f]{32}$"
"""uuid4 hex, as `notifications.new_id` makes them."""
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_.:-]{1,255}$"
UNSUBSCRIBE_TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,700}\.[A-Za-z0-9_-]{43}$"
"""A base64url payload, a dot and a base64url HMAC-SHA256."""
WALL_CLOCK_TIME_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$"
"""`HH:MM` or `HH:MM:SS`, 24-hour."""
