"""The request's correlation id: `X-Request-ID` on every request and answer (API keys and the body
limit, the other middleware of the edge, are in `security`)."""

from __future__ import annotations

import re
from uuid import uuid4

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from herald.infra.patterns import ID_PATTERN


class CorrelationIdMiddleware:
    """`X-Request-ID` from the client (a plain token) or a new one, on the request and on the answer.

    Pure ASGI rather than `@app.middleware("http")`, which costs a task and a stream per request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        correlation = given if re.fullmatch(ID_PATTERN, given) else uuid4().hex
        scope.setdefault("state", {})["correlation_id"] = correlation

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = correlation
            await send(message)

        await self.app(scope, receive, send_with_id)
