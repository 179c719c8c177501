"""An ASGI app built on its first request, for parts of the API that few requests use (the MCP server):
their imports then stay out of every API process's memory and start-up until one is asked for."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

log = logging.getLogger("lazy")


class LazyApp:
    """Mount it like the app `build` makes, and enter `running()` in the host app's lifespan.

    The first request builds the app in a thread (its imports do not stall the event loop) and starts
    the app's own lifespan, which then runs until the host's ends. Requests wait for that; later ones
    go straight to the app. A build that fails is logged, and every request to it is a 500.
    """

    def __init__(self, build: Callable[[], Starlette], name: str) -> None:
        self._build, self._name = build, name
        self._app: Starlette | None = None
        self._wanted: asyncio.Event | None = None
        self._ready: asyncio.Future[Starlette] | None = None

    @property
    def built(self) -> bool:
        return self._app is not None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """While the host app runs: a task that builds the app when first wanted and holds its lifespan.

        A second lifespan of the same host (a test client beside another one) gets its own build and
        leaves the first one's state as it found it.
        """
        wanted, stop = asyncio.Event(), asyncio.Event()
        ready: asyncio.Future[Starlette] = asyncio.get_running_loop().create_future()
        outer = (self._app, self._wanted, self._ready)
        self._app, self._wanted, self._ready = None, wanted, ready
        holder = asyncio.create_task(self._hold(wanted, ready, stop))
        try:
            yield
        finally:
            stop.set()
            wanted.set()
            await holder
            if self._ready is ready:
                self._app, self._wanted, self._ready = outer

    async def _hold(self, wanted: asyncio.Event, ready: asyncio.Future[Starlette], stop: asyncio.Event) -> None:
        """Build, enter the app's lifespan and stay in it until `stop`: one task enters and leaves it,
        as its task groups (the MCP session manager's) require."""
        await wanted.wait()
        if stop.is_set():
            return
        try:
            app = await asyncio.to_thread(self._build)
            async with app.router.lifespan_context(app):
                if self._ready is ready:
                    self._app = app
                ready.set_result(app)
                await stop.wait()
        except Exception as exc:
            log.exception("%s could not be started", self._name)
            if not ready.done():
                ready.set_exception(exc)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            if self._wanted is None or self._ready is None:
                raise RuntimeError(f"{self._name} is not running: enter LazyApp.running() in the app's lifespan")
            self._wanted.set()
            await asyncio.shield(self._ready)  # a request given up must not cancel the build for the others
        assert self._app is not None
        await self._app(scope, receive, send)
