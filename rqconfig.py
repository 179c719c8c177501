"""Settings module for RQ's command line: `rq worker -c rqconfig high default low`, `rq info -c rqconfig`.

RQ reads the upper-case names of this module; the values come from `settings.py`, so the `rq`
commands use the same `REDIS_URL` (environment or `.env`) as the service. A `redis+sentinel://` URL
becomes RQ's `SENTINEL` dict (RQ's CLI reads `REDIS_URL` first, so it is then None).
"""

from __future__ import annotations

from typing import Any

from herald.infra.connections import SENTINEL_TIMEOUT_SECONDS, parse_sentinel_url
from settings import Settings, get_settings


def sentinel_config(settings: Settings) -> dict[str, Any] | None:
    """RQ's `SENTINEL` dict for a `redis+sentinel://` URL; None for any other URL."""
    target = parse_sentinel_url(settings.redis_url)
    if target is None:
        return None
    password = settings.redis_sentinel_password
    sentinel_kwargs = {"socket_timeout": SENTINEL_TIMEOUT_SECONDS, "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS}
    return {
        "INSTANCES": list(target.sentinels),
        "MASTER_NAME": target.master,
        "DB": target.db,
        "PASSWORD": target.password,
        "SENTINEL_KWARGS": sentinel_kwargs | ({"password": password.get_secret_value()} if password else {}),
    }


SENTINEL = sentinel_config(get_settings())
REDIS_URL = None if SENTINEL else get_settings().redis_url
