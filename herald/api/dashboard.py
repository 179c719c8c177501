"""rq-dashboard at `/rq`, behind HTTP Basic auth, optionally read-only; never served without a password."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis_sentinel_url
from a2wsgi import WSGIMiddleware
from a2wsgi.wsgi_typing import Environ, IterableChunks, StartResponse
from fastapi import FastAPI
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from herald.infra.connections import SENTINEL_SCHEME
from settings import Settings

if TYPE_CHECKING:  # Flask and rq-dashboard are imported on the dashboard's first request (`LazyDashboard`)
    from flask import Flask, Response

log = logging.getLogger("dashboard")

DASHBOARD_PATH = "/rq"
REALM = "RQ Dashboard"
READ_METHODS = frozenset({"GET", "HEAD"})
REQUEUE_ALL_PREFIX = "/requeue/"
"""rq-dashboard's "requeue all" also answers GET, so read-only mode refuses it by path as well."""


def mount_dashboard(app: FastAPI, settings: Settings) -> bool:
    """Serve rq-dashboard at `/rq` if a dashboard password is set; else log a warning and serve nothing."""
    password = settings.dashboard_password.get_secret_value() if settings.dashboard_password else ""
    if not password:
        log.warning("rq-dashboard is not served at %s: set DASHBOARD_PASSWORD to enable it", DASHBOARD_PATH)
        return False
    try:
        redis_sentinel_url.connect(_redis_url(settings))  # how rq-dashboard reads it; connects to nothing
    except ValueError as exc:  # a REDIS_URL redis-py can't parse: the API still starts, without the dashboard
        log.error("rq-dashboard is not served at %s: %s", DASHBOARD_PATH, exc)
        return False
    dashboard = WSGIMiddleware(LazyDashboard(lambda: make_dashboard(settings, password)))
    app.mount(DASHBOARD_PATH, dashboard)  # type: ignore[arg-type]
    log.info("rq-dashboard served at %s (read-only: %s)", DASHBOARD_PATH, settings.dashboard_read_only)
    return True


class LazyDashboard:
    """The WSGI app that builds the dashboard on its first request, in a2wsgi's thread: Flask and
    rq-dashboard stay out of the memory of every API process until someone opens `/rq` there."""

    def __init__(self, build: Callable[[], Flask]) -> None:
        self._build = build
        self._app: Flask | None = None
        self._building = threading.Lock()

    def __call__(self, environ: Environ, start_response: StartResponse) -> IterableChunks:
        return self._built()(environ, start_response)  # type: ignore[arg-type]  # a2wsgi's environ is a TypedDict

    def _built(self) -> Flask:
        with self._building:
            if self._app is None:
                self._app = self._build()
            return self._app


def make_dashboard(settings: Settings, password: str) -> Flask:
    """The rq-dashboard Flask app on the service's Redis, with our auth, read-only guard and Redis error page."""
    from rq_dashboard.cli import make_flask_app
    from rq_dashboard.web import setup_rq_connection

    # No username here: rq-dashboard's own basic auth compares with `!=` and is added to its module-level
    # blueprint, so it would pile up on every app built in the same process.
    flask_app: Flask = make_flask_app(None, None, None, "")
    flask_app.config["RQ_DASHBOARD_REDIS_URL"] = _redis_url(settings)
    if settings.redis_sentinel_password:
        flask_app.config["RQ_DASHBOARD_REDIS_SENTINEL_PASSWORD"] = settings.redis_sentinel_password.get_secret_value()
    flask_app.config["RQ_DASHBOARD_DISABLE_DELETE"] = settings.dashboard_read_only
    setup_rq_connection(flask_app)
    flask_app.before_request(_require_auth(settings.dashboard_username, password))
    if settings.dashboard_read_only:
        flask_app.before_request(_refuse_writes)
    flask_app.register_error_handler(RedisConnectionError, _redis_unavailable)
    flask_app.register_error_handler(RedisTimeoutError, _redis_unavailable)
    return flask_app


def _redis_url(settings: Settings) -> str:
    """The service's Redis URL with its socket timeouts (rq-dashboard builds its clients from the URL alone;
    it reads `redis+sentinel://` URLs itself, with the same options, through redis-sentinel-url)."""
    parts = urlsplit(settings.redis_url)
    timeout = str(settings.redis_socket_timeout)
    query = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if parts.scheme == SENTINEL_SCHEME:
        query |= {"sentinel_socket_timeout": timeout, "sentinel_socket_connect_timeout": timeout}
    query |= dict(parse_qsl(parts.query))
    return parts._replace(query=urlencode(query)).geturl()


def _require_auth(username: str, password: str) -> Callable[[], Response | None]:
    from flask import Response, request

    def check() -> Response | None:
        auth = request.authorization
        if auth and _same(auth.username, username) & _same(auth.password, password):
            return None
        return Response("Authentication required", 401, {"WWW-Authenticate": f'Basic realm="{REALM}"'})

    return check


def _same(given: str | None, expected: str) -> bool:
    """Constant-time comparison; hashing first hides the length of the expected value too."""
    digest = hashlib.sha256
    return hmac.compare_digest(digest((given or "").encode()).digest(), digest(expected.encode()).digest())


def _refuse_writes() -> Response | None:
    from flask import Response, request

    if request.method in READ_METHODS and not request.path.startswith(REQUEUE_ALL_PREFIX):
        return None
    return Response("The dashboard is read-only", 403)


def _redis_unavailable(exc: Exception) -> Response:
    from flask import Response

    log.warning("rq-dashboard: redis unavailable: %s", type(exc).__name__)
    return Response("Redis is unavailable; try again shortly", 503, {"Retry-After": "5"})
