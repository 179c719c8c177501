"""The HTTP producer: validate the request, call one function in `queues`, shape the answer."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any
from uuid import uuid4

from fastapi import FastAPI, Header, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.job import Job, JobStatus

import dispatch
import idempotency
import inbox
import notifications
import queues
from dashboard import mount_dashboard
from exceptions import (
    IdempotencyConflict,
    JobNotFoundError,
    JobStateError,
    ServiceError,
    TargetError,
    TemplateError,
    UnknownTaskError,
)
from schemas import (
    ID_PATTERN,
    JOB_ID_PATTERN,
    ChannelName,
    EmailArgs,
    JobAccepted,
    JobPage,
    JobRequest,
    JobView,
    NotificationAccepted,
    NotificationRequest,
    NotificationView,
    Priority,
    Problem,
    SendEmailRequest,
    UserContact,
)
from settings import get_settings

log = logging.getLogger("app")

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Problem} for code in (404, 409, 422, 503)}

app = FastAPI(
    title="Job and notification service",
    description="Queue emails and registered tasks on RQ; watch them run.",
    responses=ERRORS,
)

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The id returned when the job was queued.")]


@app.exception_handler(RedisConnectionError)
@app.exception_handler(RedisTimeoutError)
async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable: %s", type(exc).__name__)
    return JSONResponse({"detail": "Redis is unavailable; try again shortly"}, status_code=503)


STATUS_OF_ERROR: dict[type[ServiceError], int] = {
    JobNotFoundError: 404,
    JobStateError: 409,
    IdempotencyConflict: 409,
    TargetError: 422,
    TemplateError: 422,
}


@app.exception_handler(ServiceError)
async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
    """Errors whose message is meant for the client: unknown ids, conflicts, unusable input."""
    status = next((code for kind, code in STATUS_OF_ERROR.items() if isinstance(exc, kind)), 400)
    return JSONResponse({"detail": str(exc)}, status_code=status)


@app.middleware("http")
async def correlation_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """`X-Request-ID` from the client (a plain token) or a new one, on the request and the answer."""
    given = request.headers.get("x-request-id", "")
    request.state.correlation_id = given if re.fullmatch(ID_PATTERN, given) else uuid4().hex
    response = await call_next(request)
    response.headers["X-Request-ID"] = request.state.correlation_id
    return response


IdempotencyKey = Annotated[
    str | None, Header(pattern=idempotency.KEY_PATTERN, description="same key within 24 h: same answer, nothing new")
]


def _idempotent(scope: str, key: str | None, body: BaseModel, make: Callable[[], BaseModel]) -> dict[str, Any]:
    """Run `make` once per Idempotency-Key and body; repeat the first answer for the same key."""
    answer = body.model_dump(mode="json")
    if key is None:
        return make().model_dump(mode="json", exclude_none=True)
    connection, digest = queues.get_redis(), idempotency.body_hash(answer)
    first = idempotency.claim(connection, scope, key, digest)
    if first is not None:
        return first
    try:
        made = make().model_dump(mode="json", exclude_none=True)
    except BaseException:
        idempotency.release(connection, scope, key)
        raise
    idempotency.store(connection, scope, key, digest, made)
    return made


def _accepted(job: Job) -> JobAccepted:
    status = job.get_status(refresh=False)
    return JobAccepted(
        job_id=job.id,
        status=status.value if status else "queued",
        queue=job.origin,
        status_url=f"/job/{job.id}",
        scheduled_for=queues.scheduled_for(job) if status == JobStatus.SCHEDULED else None,
    )


def _enqueue(task: str, kwargs: dict[str, Any], priority: Priority, due: datetime | None = None) -> JobAccepted:
    try:
        return _accepted(queues.enqueue_task(task, kwargs, priority, due))
    except UnknownTaskError as exc:
        raise HTTPException(422, {"msg": str(exc), "known_tasks": exc.known}) from None
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise HTTPException(422, [{**error, "loc": ["body", "kwargs", *error["loc"]]} for error in errors]) from None


@app.post("/send-email", status_code=202, response_model=JobAccepted, response_model_exclude_none=True)
def send_email(request: SendEmailRequest, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Queue one email, now or later; a worker sends it, retrying transient failures with backoff."""
    arguments = request.model_dump(include=set(EmailArgs.model_fields))
    return _idempotent(
        "send-email",
        idempotency_key,
        request,
        lambda: _enqueue("send_email", arguments, request.priority, request.due_at()),
    )


@app.get("/send-email/{email}", status_code=202, response_model=JobAccepted, response_model_exclude_none=True)
def send_welcome_email(email: str) -> JobAccepted:
    """Browser-friendly: queue a welcome email to the address in the path."""
    try:
        message = EmailArgs(to=email, subject="Welcome!", body="Thanks for signing up.")
    except ValidationError as exc:
        raise HTTPException(422, exc.errors(include_url=False, include_context=False)) from None
    return _enqueue("send_email", message.model_dump(), "default")


@app.post("/jobs", status_code=202, response_model=JobAccepted, response_model_exclude_none=True)
def create_job(request: JobRequest) -> JobAccepted:
    """Queue any task registered in `tasks.TASKS`, now or later; an unknown name is refused."""
    return _enqueue(request.task, request.kwargs, request.priority, request.due_at())


@app.get("/jobs/failed", response_model=JobPage)
def list_failed_jobs(
    queue: Priority | None = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """Failed jobs with their error, newest first; all queues unless one is named."""
    total, jobs = queues.failed_jobs(queue, offset, limit)
    return JobPage(total=total, offset=offset, limit=limit, jobs=[queues.job_view(job) for job in jobs])


@app.get("/jobs/scheduled", response_model=JobPage)
def list_scheduled_jobs(
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """Jobs waiting for their time, soonest first: delayed jobs and retries waiting out their backoff."""
    total, jobs = queues.scheduled_jobs(offset, limit)
    return JobPage(total=total, offset=offset, limit=limit, jobs=[queues.job_view(job) for job in jobs])


@app.get("/job/{job_id}", response_model=JobView)
def get_job(job_id: JobId) -> JobView:
    return queues.job_view(queues.fetch_job(job_id))


@app.delete("/job/{job_id}", response_model=JobView)
def cancel_job(job_id: JobId) -> JobView:
    """Cancel a job that has not started yet (409 once it has run)."""
    return queues.job_view(queues.cancel_job(job_id))


@app.post("/job/{job_id}/requeue", status_code=202, response_model=JobView)
def requeue_job(job_id: JobId) -> JobView:
    """Put a failed job back on its queue with its retries restored."""
    return queues.job_view(queues.requeue_job(job_id))


@app.post("/notifications", status_code=202, response_model=NotificationAccepted)
def create_notification(
    body: NotificationRequest, request: Request, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    """Notify a user over one or more channels; each channel's delivery is its own job and record."""
    correlation = request.state.correlation_id
    return _idempotent("notifications", idempotency_key, body, lambda: dispatch.create_notification(body, correlation))


NotificationId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]


def _found(view: NotificationView | None, notification_id: str) -> NotificationView:
    if view is None:
        raise HTTPException(404, f"no notification with id {notification_id!r}")
    return view


@app.get("/notifications/{notification_id}", response_model=NotificationView)
def get_notification(notification_id: NotificationId) -> NotificationView:
    """The notification and each delivery: status, attempts, next retry, last error."""
    return _found(dispatch.get_notification(notification_id), notification_id)


@app.delete("/notifications/{notification_id}", response_model=NotificationView)
def cancel_notification(notification_id: NotificationId) -> NotificationView:
    """Cancel every delivery that has not been made yet."""
    return _found(dispatch.cancel_notification(notification_id), notification_id)


@app.post("/notifications/{notification_id}/deliveries/{channel}/retry", status_code=202)
def retry_delivery(notification_id: NotificationId, channel: ChannelName) -> NotificationView:
    """Retry a failed delivery now, with a fresh attempt budget (409 unless it failed)."""
    return _found(dispatch.retry_delivery(notification_id, channel), notification_id)


@app.put("/users/{user_id}/contact", response_model=UserContact)
def save_contact(user_id: Annotated[str, Path(pattern=ID_PATTERN)], contact: UserContact) -> UserContact:
    """Store where a user's email and webhook notifications go when a request names no target."""
    if contact.webhook_url:
        dispatch.check_webhook_url(contact.webhook_url)
    notifications.save_contact(queues.get_redis(), user_id, contact.model_dump(mode="json"))
    return contact


app.include_router(inbox.router)


@app.get("/healthz", responses={503: {"model": Problem}})
def healthz() -> dict[str, str]:
    """200 when Redis answers; Redis errors become the 503 above."""
    queues.get_redis().ping()
    return {"status": "ok", "redis": "ok"}


mount_dashboard(app, get_settings())
