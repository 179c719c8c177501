"""Process-wide Redis clients for code that must not import `queues`: the channels and the inbox.

`queues.get_redis()` remains the client of the API's job operations and of RQ; these are built the
same way (socket timeouts from `REDIS_SOCKET_TIMEOUT`, one quick reconnect), cached per URL, so a
test that points `REDIS_URL` elsewhere and clears `get_settings` gets a client of the new server.
"""

from __future__ import annotations

from functools import lru_cache

from redis import Redis
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from settings import get_settings


@lru_cache(maxsize=8)
def client_for(url: str, socket_timeout: float) -> Redis:
    """One blocking client per URL and timeout, shared by the whole process (the API, channels, inbox)."""
    return Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


@lru_cache(maxsize=8)
def _async_client(url: str, socket_timeout: float) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=AsyncRetry(NoBackoff(), 1),
        health_check_interval=30,
    )


def redis_client() -> Redis:
    """The process's blocking client; every call waits at most `redis_socket_timeout` for Redis."""
    settings = get_settings()
    return client_for(settings.redis_url, settings.redis_socket_timeout)


def async_redis_client() -> aioredis.Redis:
    """The process's asyncio client, for pub/sub in the web server's event loop.

    Use it from one event loop only (uvicorn's). A `pubsub().listen()` waits for messages without
    a time limit; commands, connecting and re-subscribing keep `redis_socket_timeout`.
    """
    settings = get_settings()
    return _async_client(settings.redis_url, settings.redis_socket_timeout)
