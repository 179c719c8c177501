"""How errors become answers: the exception handlers `create_app` installs (`EXCEPTION_HANDLERS`), and
the error answers every operation documents (`ERRORS`).

A `ServiceError` carries a message meant for the client and becomes 4xx or 503 by its kind; Redis away
or out of memory becomes a 503; FastAPI's 422 is kept, made safe for input JSON cannot carry out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from herald.exceptions import (
    IdempotencyConflict,
    JobNotFoundError,
    JobStateError,
    NotReplicatedError,
    QueueFullError,
    ServiceError,
    TargetError,
    TemplateError,
)
from herald.notify.digests import DigestBusyError
from herald.schemas import Problem

log = logging.getLogger("app")
"""The API's logger, named as before these handlers left `app.py` (log filters may name it)."""
Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Problem} for code in (400, 404, 409, 413, 422, 503)}
"""Every operation's error answers: 400 a body that is not JSON, 413 a body over MAX_BODY_BYTES, and the rest."""
EXCEPTION_HANDLERS: dict[int | type[Exception], Handler] = {}
"""How errors become answers; `create_app` installs them."""


def _handles(*kinds: type[Exception]) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        EXCEPTION_HANDLERS.update(dict.fromkeys(kinds, handler))
        return handler

    return register


@_handles(RedisConnectionError, RedisTimeoutError)
async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable: %s", type(exc).__name__)
    return JSONResponse({"detail": "Redis is unavailable; try again shortly"}, status_code=503)


@_handles(ResponseError)
async def redis_out_of_memory(request: Request, exc: Exception) -> JSONResponse:
    """Redis at `maxmemory` (noeviction) refuses writes: 503, not a 500; other Redis errors stay 500."""
    if not (isinstance(exc, OutOfMemoryError) or str(exc).startswith("OOM")):
        raise exc
    log.error("redis is out of memory: writes are refused")
    return JSONResponse({"detail": "Redis is out of memory; try again later"}, status_code=503)


STATUS_OF_ERROR: dict[type[ServiceError], int] = {
    JobNotFoundError: 404,
    JobStateError: 409,
    IdempotencyConflict: 409,
    TargetError: 422,
    TemplateError: 422,
    QueueFullError: 429,
    NotReplicatedError: 503,
    DigestBusyError: 503,
}


def _finite(value: Any) -> Any:
    """NaN and Infinity as strings: Python's JSON parser lets them into a request, JSON cannot carry them out."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return [_finite(item) for item in value] if isinstance(value, list) else value


@_handles(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, which echoes the invalid input: one holding NaN or Infinity must not become a 500."""
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)


@_handles(ServiceError)
async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
    """Errors whose message is meant for the client: unknown ids, conflicts, unusable input."""
    status = next((code for kind, code in STATUS_OF_ERROR.items() if isinstance(exc, kind)), 400)
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=exc.headers)
