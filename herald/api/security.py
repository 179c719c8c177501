"""Pure ASGI middleware at the edge of the API: API keys, and a limit on the size of request bodies.

Both take the settings of the app they guard (`create_app`); a test that needs other keys or another
limit builds its own app with its own settings.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from pydantic import SecretStr
from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from herald.api.dashboard import DASHBOARD_PATH
from settings import Settings

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
"""Served without an API key: probes, metrics and the API docs (which hold no data)."""
DOCS_ASSETS_PATH = "/docs/assets"
"""The scripts, styles and icon of /docs and /redoc (from `fastapi-offline`), open like the pages."""
UNSUBSCRIBE_PREFIX = "/unsubscribe/"
"""One-click unsubscribe links from emails: the signed token in the path is their credential."""
OPEN_PREFIXES = (f"{DOCS_ASSETS_PATH}/", f"{DASHBOARD_PATH}/", UNSUBSCRIBE_PREFIX)
WS_POLICY_VIOLATION = 1008


def route_path(scope: Scope) -> str:
    """The request path below the app's `root_path`, as the router sees it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and (path == root or path.startswith(f"{root}/")) else path


def is_open(path: str) -> bool:
    """Paths outside the API-key check; the dashboard at `/rq` has Basic auth of its own."""
    return path in OPEN_PATHS or path == DASHBOARD_PATH or path.startswith(OPEN_PREFIXES)


def presented_key(scope: Scope) -> str | None:
    """`Authorization: Bearer <key>`, else `X-API-Key`, else (WebSocket only, for browsers) `?api_key=`."""
    headers = Headers(scope=scope)
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if key := headers.get("x-api-key"):
        return key
    if scope["type"] == "websocket":
        return QueryParams(scope.get("query_string", b"")).get("api_key") or None
    return None


def key_matches(given: str | None, keys: Sequence[SecretStr]) -> bool:
    """Compare with every key in constant time, without an early exit; hashing hides the lengths."""
    digest = hashlib.sha256((given or "").encode()).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(digest, hashlib.sha256(key.get_secret_value().encode()).digest())
    return bool(given) and matched


class ApiKeyMiddleware:
    """With `API_KEY` or `API_KEYS` set, every HTTP request and WebSocket outside `is_open` paths needs one of them.

    HTTP: 401 JSON with `WWW-Authenticate: Bearer`. WebSocket: accepted, then closed with 1008 (a close
    code reaches a browser only after the handshake).
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.keys = settings.api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allowed(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            websocket = WebSocket(scope, receive, send)
            await websocket.accept()
            await websocket.close(code=WS_POLICY_VIOLATION, reason="missing or invalid API key")
        else:
            detail = "missing or invalid API key: send Authorization: Bearer <key> or X-API-Key: <key>"
            response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)

    def allowed(self, scope: Scope) -> bool:
        if scope["type"] not in ("http", "websocket") or is_open(route_path(scope)):
            return True
        return not self.keys or key_matches(presented_key(scope), self.keys)


class BodyLimitMiddleware:
    """Refuse request bodies over `MAX_BODY_BYTES` with 413, before the app reads any of it.

    A declared `Content-Length` over the limit is refused at once; otherwise (chunked uploads too)
    the body is read here, counting bytes as they arrive, and refused as soon as the count passes
    the limit. A body within the limit is handed on to the app unchanged.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.limit = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = Headers(scope=scope).get("content-length", "")
        body = None if declared.isdigit() and int(declared) > limit else await _read_body(receive, limit)
        if body is None:
            response = JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
            await response(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


async def _read_body(receive: Receive, limit: int) -> list[Message] | None:
    """The body's messages, up to the last one or a disconnect; None once more than `limit` bytes came."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives the messages already read, then whatever comes next (a disconnect)."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
