"""The HTTP producer, as `uvicorn app:app` serves it: `create_app(settings)` puts together the routes
(`herald.api.routes`), the error answers (`herald.api.errors`), the middleware, /mcp and the dashboard."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.applications import Starlette

from herald.api.dashboard import mount_dashboard
from herald.api.errors import ERRORS, EXCEPTION_HANDLERS
from herald.api.lazy import LazyApp
from herald.api.middleware import CorrelationIdMiddleware
from herald.api.routes import router
from herald.api.security import DOCS_ASSETS_PATH, ApiKeyMiddleware, BodyLimitMiddleware, is_open
from herald.infra import connections
from herald.infra.logs import setup_logging_from
from settings import Settings, settings_or_exit


def mcp_http_app(settings: Settings) -> Starlette:
    """MCP over streamable HTTP, mounted at /mcp/ by `create_app`. Made on the first MCP request: the MCP
    SDK and FastMCP are most of what the API would otherwise import, for a route few clients use."""
    from herald.api import mcp_server

    mcp_app = mcp_server.build(settings).http_app(path="/")
    gc.freeze()  # the modules just imported, out of the collector's walks too (see `lifespan`)
    return mcp_app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The MCP server, once asked for, runs with the app; the event loop's Redis clients close after it.

    Objects made before the first start (modules, schemas, routes: most of the heap) are moved out of
    the garbage collector's generations: a full collection then no longer walks them, which stalled
    requests for tens of milliseconds under load (p99 of POST /send-email 100 ms, 28 ms after).
    """
    if not gc.get_freeze_count():
        gc.freeze()
    try:
        async with app.state.mcp_app.running():
            yield
    finally:
        await connections.close_async_clients()


API_KEY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "one of API_KEY / API_KEYS, when set"},
    "X-API-Key": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "the same key, another header"},
}
"""How to send an API key, in the schema: /docs then has an "Authorize" button that sends it on "Try it out"."""


def openapi_with_api_keys(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the API-key schemes (checked by `ApiKeyMiddleware`; routes open without a key
    say so). Without keys configured, requests without one are accepted all the same."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # FastAPI's own, which stores it in `app.openapi_schema`
        schema.setdefault("components", {})["securitySchemes"] = API_KEY_SCHEMES
        schema["security"] = [{name: []} for name in API_KEY_SCHEMES]
        for path in filter(is_open, schema["paths"]):
            for operation in schema["paths"][path].values():
                operation["security"] = []
    return app.openapi_schema or {}


def create_app(settings: Settings) -> FastAPI:
    """The API, set up from `settings`: logs, routes, error answers, middleware, /mcp and the dashboard."""
    setup_logging_from(settings)
    app = FastAPIOffline(  # /docs and /redoc with their scripts served from here: no CDN, they work offline
        title="Job and notification service",
        description="Queue emails and registered tasks on RQ; watch them run.",
        responses=ERRORS,
        lifespan=lifespan,
        static_url=DOCS_ASSETS_PATH,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.settings = settings  # what the routes read (`AppSettings`)
    app.state.mcp_app = LazyApp(lambda: mcp_http_app(settings), "the MCP server")
    app.add_middleware(BodyLimitMiddleware, settings=settings)  # 413 before any route reads the body
    app.add_middleware(ApiKeyMiddleware, settings=settings)  # added after it, so it runs first: no key, no body read
    app.add_middleware(CorrelationIdMiddleware)  # outermost: every answer carries X-Request-ID
    app.include_router(router)
    app.mount("/mcp", app.state.mcp_app)
    mount_dashboard(app, settings)
    app.openapi = lambda: openapi_with_api_keys(app)  # type: ignore[method-assign]
    return app


app = create_app(settings_or_exit())
"""What `uvicorn app:app` serves."""
