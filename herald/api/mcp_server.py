"""The service for AI agents over the Model Context Protocol: the REST job operations as MCP tools.

Each tool takes and returns the same pydantic models as its REST route (`schemas`) and calls the same
function in `herald.jobs` or `dispatch` with the app's settings (`build`), so the two interfaces cannot drift
apart. Errors a client can act on (unknown task or job, a job in the wrong state, unusable input, Redis
away) become `ToolError`s with a clear message; anything else is masked. Served over streamable HTTP at
`/mcp/` by `app.py`, behind the same API key as the REST routes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated
from uuid import uuid4

from fastmcp import FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.dependencies import get_http_request
from pydantic import Field, JsonValue, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

from herald.exceptions import ServiceError
from herald.infra.patterns import JOB_ID_PATTERN
from herald.jobs import enqueue, states, store, views
from herald.notify import dispatch
from herald.schemas import (
    JobAccepted,
    JobPage,
    JobRequest,
    JobView,
    NotificationAccepted,
    NotificationRequest,
    Priority,
    Schedule,
)
from settings import Settings

JobId = Annotated[str, Field(pattern=JOB_ID_PATTERN, description="The id returned when the job was created.")]
READ_ONLY = {"readOnlyHint": True}


@contextmanager
def _tool_errors() -> Iterator[None]:
    """Turn the errors a client can act on into tool errors with a clear message."""
    try:
        yield
    except ServiceError as exc:  # unknown task or job, wrong state, template or target refused
        raise ToolError(str(exc)) from None
    except ValidationError as exc:  # a task's kwargs
        raise ToolError(f"invalid kwargs: {_problems(exc)}") from None
    except (RedisConnectionError, RedisTimeoutError):
        raise ToolError("Redis is unavailable; try again shortly") from None
    except OutOfMemoryError:  # Redis at maxmemory (noeviction) refuses writes
        raise ToolError("Redis is out of memory; try again later") from None


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, error['loc'])) or 'kwargs'}: {error['msg']}" for error in exc.errors())


def _on_time(settings: Settings, request: Schedule) -> None:
    """A due time beyond the horizon or too far in the past is refused, as the REST routes refuse it."""
    if problem := request.schedule_problem(settings):
        raise ToolError(f"invalid request: {problem}")


def _correlation_id() -> str:
    """Over HTTP, the request's X-Request-ID (set by `middleware.CorrelationIdMiddleware`); else a new id."""
    try:
        given = getattr(get_http_request().state, "correlation_id", None)
    except RuntimeError:  # in-process transport: no HTTP request
        given = None
    return given if isinstance(given, str) and given else uuid4().hex


def build(settings: Settings) -> FastMCP:
    """The MCP server of an app with `settings`: each tool calls `herald.jobs` or `dispatch` with them."""
    mcp = FastMCP(
        "jobs",
        instructions=(
            "Queue background jobs and notifications, follow them, and handle failures. A task of kind "
            "await_completion waits for a person or outside system: finish it with complete_task."
        ),
        mask_error_details=True,
    )

    @mcp.tool
    def create_task(request: JobRequest) -> JobAccepted:
        """Queue a registered task (`POST /jobs`): now, or after `delay_seconds` / at `send_at`.

        Tasks: `send_email` (kwargs to, subject, body), `noop`, and `await_completion` (kwargs description),
        which no worker runs: it waits until `complete_task` finishes it.
        """
        _on_time(settings, request)
        with _tool_errors():
            job = enqueue.enqueue_task(settings, request.task, request.kwargs, request.priority, request.due_at())
            return views.job_accepted(job)

    @mcp.tool(annotations=READ_ONLY)
    def get_task(job_id: JobId) -> JobView:
        """A job's status (`GET /job/{id}`): queued, scheduled, started, finished, failed, waiting, ...;
        its times, retries left, result and last error."""
        with _tool_errors():
            return views.job_view(store.fetch_job(settings, job_id))

    @mcp.tool
    def complete_task(
        job_id: JobId, result: Annotated[JsonValue, Field(description="the outcome, any JSON value")] = None
    ) -> JobView:
        """Finish a waiting `await_completion` job with its result; any other job, or one no longer
        waiting, is refused (running jobs are never touched)."""
        with _tool_errors():
            return views.job_view(states.complete_job(settings, job_id, result))

    @mcp.tool
    def trigger_notification(request: NotificationRequest) -> NotificationAccepted:
        """Notify a user over email, webhook and/or in_app (`POST /notifications`); one job per channel."""
        _on_time(settings, request)
        with _tool_errors():
            return dispatch.create_notification(settings, request, _correlation_id())

    @mcp.tool(annotations=READ_ONLY)
    def list_failed(
        queue: Priority | None = None,
        offset: Annotated[int, Field(ge=0, le=1_000_000)] = 0,
        limit: Annotated[int, Field(ge=1, le=200)] = 50,
    ) -> JobPage:
        """Failed jobs with their error, newest first (`GET /jobs/failed`); all queues unless one is named."""
        with _tool_errors():
            total, jobs = views.failed_jobs(settings, queue, offset, limit)
            return JobPage(total=total, offset=offset, limit=limit, jobs=[views.job_view(job) for job in jobs])

    @mcp.tool
    def requeue(job_id: JobId) -> JobView:
        """Put a failed job back on its queue with its retries restored (`POST /job/{id}/requeue`)."""
        with _tool_errors():
            return views.job_view(states.requeue_job(settings, job_id))

    return mcp
