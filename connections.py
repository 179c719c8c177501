"""Process-wide Redis clients for code that must not import `queues`: the channels and the inbox.

`queues.get_redis()` remains the client of the API's job operations and of RQ; these are built the
same way (socket timeouts from `REDIS_SOCKET_TIMEOUT`, one quick reconnect), cached per URL, so a
test that points `REDIS_URL` elsewhere and clears `get_settings` gets a client of the new server.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from functools import lru_cache
from typing import Any, cast
from urllib.parse import urlsplit

from redis import Redis
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.connection import HiredisRespSerializer
from redis.exceptions import NoScriptError
from redis.retry import Retry
from redis.typing import EncodableT
from redis.utils import HIREDIS_AVAILABLE

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


_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, float], aioredis.Redis]]
_async_clients = weakref.WeakKeyDictionary()
"""Per event loop: an asyncio client's connections belong to the loop that opened them (a test
client runs its own loop; uvicorn one per process)."""


_HIREDIS = HiredisRespSerializer()


class _HiredisPacking(aioredis.Connection):
    """Commands packed by hiredis, as redis-py's blocking connections do: its asyncio ones pack them in
    Python, which was a third of a `POST /send-email` (an enqueue sends RQ's 60-odd words)."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        if not HIREDIS_AVAILABLE:
            return super().pack_command(*args)
        return cast(list[bytes], _HIREDIS.pack(*cast(Any, args)))


class _HiredisPackingSSL(_HiredisPacking, aioredis.SSLConnection):
    pass


def _async_client(url: str, socket_timeout: float) -> aioredis.Redis:
    clients = _async_clients.setdefault(asyncio.get_running_loop(), {})
    if (url, socket_timeout) not in clients:
        options: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
        options |= {"retry": AsyncRetry(NoBackoff(), 1), "health_check_interval": 30}
        packing = {"redis": _HiredisPacking, "rediss": _HiredisPackingSSL}.get(urlsplit(url).scheme)
        if packing is not None:  # unix:// keeps redis-py's own connection class
            options["connection_class"] = packing
        clients[url, socket_timeout] = aioredis.Redis.from_url(url, **options)
    return clients[url, socket_timeout]


def redis_client() -> Redis:
    """The process's blocking client; every call waits at most `redis_socket_timeout` for Redis."""
    settings = get_settings()
    return client_for(settings.redis_url, settings.redis_socket_timeout)


def async_redis_client() -> aioredis.Redis:
    """The asyncio client of the running event loop, for the web server's pub/sub and enqueueing.

    A `pubsub().listen()` waits for messages without a time limit; commands, connecting and
    re-subscribing keep `redis_socket_timeout`.
    """
    settings = get_settings()
    return _async_client(settings.redis_url, settings.redis_socket_timeout)


async def close_async_clients() -> None:
    """Close the running loop's asyncio clients (at the end of the app's lifespan)."""
    for client in _async_clients.pop(asyncio.get_running_loop(), {}).values():
        await client.aclose()


REPLAY_SCRIPT = """
local i = 1
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + count))
  i = i + count + 1
end
return i
"""
"""Run the commands in ARGV, each as its word count followed by its words, in one atomic step. Its keys
are not declared, which Redis Cluster would refuse; RQ does not run on a cluster either."""
_REPLAY_SHA = hashlib.sha1(REPLAY_SCRIPT.encode()).hexdigest()


async def execute_async(recorded: Pipeline) -> None:
    """Apply the commands written on a blocking pipeline that was never executed (RQ's code writes
    to one) through the asyncio client, as one script: all or none, like MULTI/EXEC, but one
    command and one reply instead of a transaction's, which cost a third of an enqueue request."""
    words: list[Any] = []
    for args, _options in recorded.command_stack:
        words += [len(args), *args]
    client = async_redis_client()
    try:
        await client.evalsha(_REPLAY_SHA, 0, *words)
    except NoScriptError:
        await client.eval(REPLAY_SCRIPT, 0, *words)
