"""Every Redis client of the service, from one URL: `redis://`, `rediss://`, `unix://` directly, or
`redis+sentinel://[:password@]host:port[,host:port...]/<master name>[/<db>]` through Sentinel.

With Sentinel a client asks the sentinels for the primary's address whenever it opens a connection
(redis-py's `Sentinel.master_for`), so after a failover every process reaches the new primary by
itself. `REDIS_SENTINEL_PASSWORD` is for sentinels that require one; the URL's password is the
data nodes'. The API's clients (`client_for`, `async_redis_client`) are cached per URL and timeout,
so settings that name another server get a client of that server.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from redis import Redis
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelConnection
from redis.backoff import NoBackoff
from redis.connection import Connection, ConnectionPool, HiredisRespSerializer
from redis.exceptions import RedisError
from redis.retry import Retry
from redis.sentinel import Sentinel
from redis.typing import EncodableT
from redis.utils import HIREDIS_AVAILABLE

from herald.exceptions import NotReplicatedError
from herald.infra import keys
from settings import Settings

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
SENTINEL_TIMEOUT_SECONDS = 0.5
"""How long a client waits for one sentinel's answer (where the caller sets no timeout of its own)."""


@dataclass(frozen=True)
class SentinelUrl:
    """The parts of a `redis+sentinel://` URL, as rq-dashboard (redis-sentinel-url) reads them."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelUrl | None:
    """The sentinels, master name, db and data-node password of a `redis+sentinel://` URL; None for
    any other scheme. Raises `ValueError` for a sentinel URL without a master name."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    auth, _, hosts = parts.netloc.rpartition("@")
    password = unquote(auth.partition(":")[2]) if ":" in auth else None
    path = [part for part in parts.path.split("/") if part]
    if not path or not hosts:
        raise ValueError(f"{SENTINEL_SCHEME}:// needs host:port[,host:port...]/<master name>[/<db>]")
    sentinels = tuple(_host_port(host) for host in hosts.split(","))
    return SentinelUrl(sentinels, unquote(path[0]), int(path[1]) if len(path) > 1 else 0, password or None)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    return host.strip("[]"), int(port) if port else SENTINEL_PORT


def _sentinel_kwargs(password: str | None, options: dict[str, Any]) -> dict[str, Any]:
    timeout = options.get("socket_timeout") or SENTINEL_TIMEOUT_SECONDS
    return {"password": password, "socket_timeout": timeout, "socket_connect_timeout": timeout}


def make_client(url: str, sentinel_password: str | None = None, **options: Any) -> Redis:
    """A new blocking client of the primary; `options` are redis-py's connection options."""
    target = parse_sentinel_url(url)
    if target is None:
        return Redis.from_url(url, **options)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(sentinel_password, options), **options)
    return cast(Redis, sentinel.master_for(target.master, db=target.db, password=target.password))


def settings_client(settings: Settings, **options: Any) -> Redis:
    """A new blocking client of the configured primary, for a long-running process (worker, scheduler)."""
    password = settings.redis_sentinel_password
    return make_client(settings.redis_url, password.get_secret_value() if password else None, **options)


@lru_cache(maxsize=8)
def client_for(url: str, socket_timeout: float, sentinel_password: str | None = None) -> Redis:
    """One blocking client per URL and timeout, shared by the whole process (the API, channels, inbox)."""
    return make_client(
        url,
        sentinel_password,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


_AsyncClients = dict[tuple[str, float], tuple[aioredis.Redis, list[aioredis.Redis]]]
"""(URL, timeout) -> the client, and the clients of its sentinels (closed with it)."""
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncClients] = weakref.WeakKeyDictionary()
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


class _HiredisPackingSentinel(_HiredisPacking, AsyncSentinelConnection):
    pass


def _async_client(url: str, socket_timeout: float, sentinel_password: str | None) -> aioredis.Redis:
    clients = _async_clients.setdefault(asyncio.get_running_loop(), {})
    if (url, socket_timeout) not in clients:
        options: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
        options |= {"retry": AsyncRetry(NoBackoff(), 1), "health_check_interval": 30}
        clients[url, socket_timeout] = _new_async_client(url, sentinel_password, options)
    return clients[url, socket_timeout][0]


def _new_async_client(
    url: str, sentinel_password: str | None, options: dict[str, Any]
) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
    target = parse_sentinel_url(url)
    if target is not None:
        kwargs = _sentinel_kwargs(sentinel_password, options)
        sentinel = AsyncSentinel(list(target.sentinels), sentinel_kwargs=kwargs, **options)
        master = sentinel.master_for(
            target.master, db=target.db, password=target.password, connection_class=_HiredisPackingSentinel
        )
        return master, list(sentinel.sentinels)
    packing = {"redis": _HiredisPacking, "rediss": _HiredisPackingSSL}.get(urlsplit(url).scheme)
    if packing is not None:  # unix:// keeps redis-py's own connection class
        options["connection_class"] = packing
    return aioredis.Redis.from_url(url, **options), []


FENCE_KEY = keys.REPLICATION_FENCE
"""Written just before each WAIT: replication is one ordered stream, so a replica that has this write
has every earlier write of the primary, whichever connection made it."""


@dataclass
class _Pin:
    client: Redis
    connection: Connection
    reconnected: bool = False

    def on_connect(self, connection: Connection) -> None:
        self.reconnected = True


_pinned: ContextVar[_Pin | None] = ContextVar("pinned_redis", default=None)


class _OneConnectionPool:
    """A pool of one connection lent by a real pool, so that RQ's pipelines within a block of writes
    use it too; everything else is the real pool's."""

    def __init__(self, pool: ConnectionPool, connection: Connection) -> None:
        self._pool = pool
        self._connection: Connection | None = connection

    def get_connection(self, *args: Any, **kwargs: Any) -> Connection:
        return self._connection or self._pool.get_connection()

    def release(self, connection: Connection) -> None:
        if connection is not self._connection:
            self._pool.release(connection)

    def give_back(self) -> None:
        """End of the block: the connection returns to the real pool, and so does every later
        command of objects that kept this client (a job returned to the caller)."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            self._pool.release(connection)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


@contextmanager
def replicated_writes(settings: Settings) -> Iterator[None]:
    """Run a block's writes through one connection, then `WAIT REDIS_WAIT_REPLICAS REDIS_WAIT_TIMEOUT_MS`
    on it; raise `NotReplicatedError` when fewer replicas confirm, or when the connection was opened
    again on the way (its writes may have gone to a primary that is gone). Nested blocks wait once, at
    the end."""
    replicas, timeout_ms = settings.redis_wait_replicas, settings.redis_wait_timeout_ms
    if replicas <= 0 or _pinned.get() is not None:
        yield
        return
    pool = redis_client(settings).connection_pool
    connection = pool.get_connection()
    lent = _OneConnectionPool(pool, connection)
    pin = _Pin(Redis(connection_pool=cast(ConnectionPool, lent)), connection)
    connection.register_connect_callback(pin.on_connect)
    token = _pinned.set(pin)
    try:
        yield
        _confirm(pin, replicas, timeout_ms)
    finally:
        _pinned.reset(token)
        connection.deregister_connect_callback(pin.on_connect)
        lent.give_back()


def _confirm(pin: _Pin, replicas: int, timeout_ms: int) -> None:
    try:
        with pin.client.pipeline(transaction=False) as pipeline:
            pipeline.set(FENCE_KEY, 1)
            pipeline.execute_command("WAIT", replicas, timeout_ms)
            confirmed = int(pipeline.execute()[1])
    except RedisError:
        confirmed = 0
    if pin.reconnected or confirmed < replicas:
        raise NotReplicatedError(0 if pin.reconnected else confirmed, replicas)


def _sentinel_password(settings: Settings) -> str | None:
    return settings.redis_sentinel_password.get_secret_value() if settings.redis_sentinel_password else None


def redis_client(settings: Settings) -> Redis:
    """The process's blocking client of `settings`; every call waits at most `redis_socket_timeout` for Redis.

    Inside `replicated_writes`, the one connection that block's writes go through.
    """
    pinned = _pinned.get()
    if pinned is not None:
        return pinned.client
    return client_for(settings.redis_url, settings.redis_socket_timeout, _sentinel_password(settings))


def async_redis_client(settings: Settings) -> aioredis.Redis:
    """The asyncio client of the running event loop, for the web server's pub/sub and enqueueing.

    A `pubsub().listen()` waits for messages without a time limit; commands, connecting and
    re-subscribing keep `redis_socket_timeout`.
    """
    return _async_client(settings.redis_url, settings.redis_socket_timeout, _sentinel_password(settings))


async def close_async_clients() -> None:
    """Close the running loop's asyncio clients (at the end of the app's lifespan)."""
    for client, sentinels in _async_clients.pop(asyncio.get_running_loop(), {}).values():
        for each in (client, *sentinels):
            await each.aclose()
