"""Every route of the API on one router (`create_app` includes it): validate the request, call one
function of `herald.jobs` or `dispatch` with the app's settings (`AppSettings`), shape the answer.

`HTTPException` is raised only by routes (here and in `inbox`): the layers below raise `herald.exceptions`,
which `errors` turns into answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from herald.api import idempotency, inbox
from herald.api.state import AppSettings
from herald.exceptions import UnknownTaskError
from herald.infra import metrics
from herald.infra.patterns import ID_PATTERN, IDEMPOTENCY_KEY_PATTERN, JOB_ID_PATTERN, NOTIFICATION_ID_PATTERN
from herald.jobs import cron, enqueue, states, store, views
from herald.notify import dispatch, notifications
from herald.notify import unsubscribe as unsubscribe_links
from herald.schemas import (
    ChannelName,
    ContactView,
    DigestView,
    EmailArgs,
    JobAccepted,
    JobPage,
    JobRequest,
    JobsAccepted,
    JobView,
    NotificationAccepted,
    NotificationRequest,
    NotificationView,
    PeriodicJobList,
    Preferences,
    Priority,
    Problem,
    Schedule,
    SendEmailBatch,
    SendEmailRequest,
    Unsubscribed,
    UserContact,
)
from settings import Settings

router = APIRouter()
"""Every route of the API; `create_app` includes it."""


JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The id returned when the job was queued.")]


IdempotencyKey = Annotated[
    str | None, Header(pattern=IDEMPOTENCY_KEY_PATTERN, description="same key within 24 h: same answer, nothing new")
]


def within_horizon(settings: Settings, body: Schedule) -> None:
    """A due time beyond `SCHEDULE_HORIZON_DAYS` or too far in the past: FastAPI's 422, as if the body's
    own validation had refused it (the schema cannot see the app's settings)."""
    problem = body.schedule_problem(settings)
    if problem is not None:
        given = body.model_dump(mode="json", exclude_unset=True, by_alias=True)
        error = {"type": "value_error", "loc": ("body",), "msg": f"Value error, {problem}", "input": given}
        raise RequestValidationError([{**error, "ctx": {"error": ValueError(problem)}}], body=given)


def _idempotent(
    settings: Settings, scope: str, key: str | None, body: BaseModel, make: Callable[[], BaseModel]
) -> dict[str, Any]:
    """Run `make` once per Idempotency-Key and body; repeat the first answer for the same key."""
    answer = body.model_dump(mode="json")
    if key is None:
        return make().model_dump(mode="json", exclude_none=True)
    with store.replicated(settings):  # a repeated answer too: only once replicas have what it names
        connection, digest = store.get_redis(settings), idempotency.body_hash(answer)
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


@contextmanager
def _task_errors() -> Iterator[None]:
    """An unknown task or bad task arguments: 422 saying which."""
    try:
        yield
    except UnknownTaskError as exc:
        raise HTTPException(422, {"msg": str(exc), "known_tasks": exc.known}) from None
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise HTTPException(422, [{**error, "loc": ["body", "kwargs", *error["loc"]]} for error in errors]) from None


def _enqueue(
    settings: Settings, task: str, kwargs: dict[str, Any], priority: Priority, due: datetime | None = None
) -> JobAccepted:
    with _task_errors():
        return views.job_accepted(enqueue.enqueue_task(settings, task, kwargs, priority, due))


@router.post("/send-email", status_code=202, response_model=JobAccepted, response_model_exclude_none=True)
async def send_email(
    request: SendEmailRequest, http: Request, idempotency_key: IdempotencyKey = None
) -> dict[str, Any] | Response:
    """Queue one email, now or later; a worker sends it, retrying transient failures with backoff.

    On the event loop, with one round trip to Redis (the hot path); with an Idempotency-Key, in a
    thread through the blocking client, as the other routes.
    """
    settings: Settings = http.app.state.settings  # not `AppSettings`: no dependency to solve on the hot path
    within_horizon(settings, request)
    if idempotency_key is not None:
        arguments = request.model_dump(include=set(EmailArgs.model_fields))
        make = lambda: _enqueue(settings, "send_email", arguments, request.priority, request.due_at())  # noqa: E731
        return await run_in_threadpool(_idempotent, settings, "send-email", idempotency_key, request, make)
    with _task_errors():
        job = await enqueue.enqueue_task_async(settings, "send_email", request, request.priority, request.due_at())
    accepted = views.job_accepted(job).model_dump_json(exclude_none=True)  # a JobAccepted already: not checked again
    return Response(accepted, status_code=202, media_type="application/json")


@router.post("/send-email/batch", status_code=202, response_model=JobsAccepted, response_model_exclude_none=True)
def send_email_batch(settings: AppSettings, request: SendEmailBatch) -> Response:
    """Queue up to 1,000 emails in one request and one Redis transaction (all or none).

    The answer (`JobsAccepted`) is written directly: its values are ids made here and the validated
    priority, and checking a thousand of them against the model again cost a tenth of the request.
    """
    emails = [email.model_dump(mode="json") for email in request.emails]
    statuses = enqueue.enqueue_emails(settings, emails, request.priority)
    accepted = [
        {"job_id": id_, "status": status.value, "queue": request.priority, "status_url": f"/job/{id_}"}
        for id_, status in statuses.items()
    ]
    return JSONResponse({"jobs": accepted}, status_code=202)


@router.get("/send-email/{email}", status_code=202, response_model=JobAccepted, response_model_exclude_none=True)
def send_welcome_email(settings: AppSettings, email: str) -> JobAccepted:
    """Browser-friendly: queue a welcome email to the address in the path."""
    try:
        message = EmailArgs(to=email, subject="Welcome!", body="Thanks for signing up.")
    except ValidationError as exc:
        raise HTTPException(422, exc.errors(include_url=False, include_context=False)) from None
    return _enqueue(settings, "send_email", message.model_dump(), "default")


@router.post("/jobs", status_code=202, response_model=JobAccepted, response_model_exclude_none=True)
def create_job(settings: AppSettings, request: JobRequest) -> JobAccepted:
    """Queue any task registered in `tasks.TASKS`, now or later; an unknown name is refused."""
    within_horizon(settings, request)
    return _enqueue(settings, request.task, request.kwargs, request.priority, request.due_at())


@router.get("/jobs/failed", response_model=JobPage)
def list_failed_jobs(
    settings: AppSettings,
    queue: Priority | None = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """Failed jobs with their error, newest first; all queues unless one is named."""
    total, jobs = views.failed_jobs(settings, queue, offset, limit)
    return JobPage(total=total, offset=offset, limit=limit, jobs=[views.job_view(job) for job in jobs])


@router.get("/jobs/scheduled", response_model=JobPage)
def list_scheduled_jobs(
    settings: AppSettings,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """Jobs waiting for their time, soonest first: delayed jobs and retries waiting out their backoff."""
    total, jobs = views.scheduled_jobs(settings, offset, limit)
    return JobPage(total=total, offset=offset, limit=limit, jobs=[views.job_view(job) for job in jobs])


@router.get("/jobs/periodic", response_model=PeriodicJobList)
def list_periodic_jobs(settings: AppSettings) -> PeriodicJobList:
    """Each periodic job (declared in `cron.py`) with its schedule, its last run and its next run."""
    return cron.periodic_jobs(store.get_redis(settings))


@router.get("/job/{job_id}", response_model=JobView)
def get_job(settings: AppSettings, job_id: JobId) -> JobView:
    return views.job_view(store.fetch_job(settings, job_id))


@router.delete("/job/{job_id}", response_model=JobView)
def cancel_job(settings: AppSettings, job_id: JobId) -> JobView:
    """Cancel a job that has not started yet (409 once it has run)."""
    return views.job_view(states.cancel_job(settings, job_id))


@router.post("/job/{job_id}/requeue", status_code=202, response_model=JobView)
def requeue_job(settings: AppSettings, job_id: JobId) -> JobView:
    """Put a failed job back on its queue with its retries restored."""
    return views.job_view(states.requeue_job(settings, job_id))


@router.post("/notifications", status_code=202, response_model=NotificationAccepted)
def create_notification(
    settings: AppSettings, body: NotificationRequest, request: Request, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    """Notify a user over one or more channels; each channel's delivery is its own job and record."""
    within_horizon(settings, body)
    correlation = request.state.correlation_id
    make = lambda: dispatch.create_notification(settings, body, correlation)  # noqa: E731
    return _idempotent(settings, "notifications", idempotency_key, body, make)


NotificationId = Annotated[str, Path(pattern=NOTIFICATION_ID_PATTERN)]


def _found(view: NotificationView | None, notification_id: str) -> NotificationView:
    if view is None:
        raise HTTPException(404, f"no notification with id {notification_id!r}")
    return view


@router.get("/notifications/{notification_id}", response_model=NotificationView)
def get_notification(settings: AppSettings, notification_id: NotificationId) -> NotificationView:
    """The notification and each delivery: status, attempts, next retry, last error."""
    return _found(dispatch.get_notification(settings, notification_id), notification_id)


@router.delete("/notifications/{notification_id}", response_model=NotificationView)
def cancel_notification(settings: AppSettings, notification_id: NotificationId) -> NotificationView:
    """Cancel every delivery that has not been made yet."""
    return _found(dispatch.cancel_notification(settings, notification_id), notification_id)


@router.post("/notifications/{notification_id}/deliveries/{channel}/retry", status_code=202)
def retry_delivery(settings: AppSettings, notification_id: NotificationId, channel: ChannelName) -> NotificationView:
    """Retry a failed delivery now, with a fresh attempt budget (409 unless it failed)."""
    return _found(dispatch.retry_delivery(settings, notification_id, channel), notification_id)


@router.get("/digests/{delivery_id}", response_model=DigestView)
def get_digest(settings: AppSettings, delivery_id: NotificationId) -> DigestView:
    """A digest (the `digest_delivery_id` of its notifications' deliveries): its notifications and its delivery."""
    view = dispatch.get_digest(settings, delivery_id)
    if view is None:
        raise HTTPException(404, f"no digest with delivery id {delivery_id!r}")
    return view


UserId = Annotated[str, Path(pattern=ID_PATTERN)]


@router.put("/users/{user_id}/contact", response_model=ContactView)
def save_contact(settings: AppSettings, user_id: UserId, contact: UserContact) -> ContactView:
    """Store where a user's email (`to`) and webhook notifications go when a request names no target."""
    if contact.webhook_url:
        dispatch.check_webhook_url(settings, contact.webhook_url)
    notifications.save_contact(
        store.get_redis(settings), user_id, {"email": contact.to, "webhook_url": contact.webhook_url}
    )
    return ContactView.of(contact.to, contact.webhook_url)


@router.put("/users/{user_id}/preferences", response_model=Preferences)
def save_preferences(settings: AppSettings, user_id: UserId, wishes: Preferences) -> Preferences:
    """Replace a user's preferences; parts left out take their defaults (every channel on, no topic
    exceptions, no quiet hours). The answer is what is stored, every channel listed."""
    return dispatch.save_preferences(settings, user_id, wishes)


@router.get("/users/{user_id}/preferences", response_model=Preferences)
def get_preferences(settings: AppSettings, user_id: UserId) -> Preferences:
    """A user's preferences; the defaults for a user who never stored any."""
    return dispatch.get_preferences(settings, user_id)


UnsubscribeToken = Annotated[str, Path(max_length=800, description="the signed token from an email's link")]
HTML_ANSWERS: dict[int | str, dict[str, Any]] = {
    code: {"content": {"text/html": {"schema": {"type": "string"}}}} for code in (200, 400)
}
"""The pages of the unsubscribe routes; their other errors (422, 503) stay JSON, as everywhere."""


@router.get("/unsubscribe/{token}", responses=HTML_ANSWERS)
def unsubscribe_page(settings: AppSettings, token: UnsubscribeToken) -> HTMLResponse:
    """A page with one button that unsubscribes; opening it changes nothing (mail scanners open links).
    Needs no API key."""
    subscription = dispatch.read_unsubscribe_token(settings, token)
    if subscription is None:
        return HTMLResponse(unsubscribe_links.invalid_page(), 400, unsubscribe_links.SECURITY_HEADERS)
    return HTMLResponse(unsubscribe_links.confirm_page(subscription), 200, unsubscribe_links.SECURITY_HEADERS)


@router.post(
    "/unsubscribe/{token}",
    response_model=Unsubscribed,
    responses={**HTML_ANSWERS, 400: {**HTML_ANSWERS[400], "model": Problem}},
)
def unsubscribe(settings: AppSettings, token: UnsubscribeToken, request: Request) -> Response:
    """One-click unsubscribe (RFC 8058), as mail readers POST it, and the page's button: the token's
    topic and channel are turned off for its user. A bad or altered token is a 400 that changes nothing.
    Needs no API key; any body (`List-Unsubscribe=One-Click`) is accepted and ignored. A browser
    (`Accept: text/html`) gets a page, anything else JSON."""
    subscription = dispatch.unsubscribe(settings, token)
    browser = "text/html" in request.headers.get("accept", "")
    if subscription is None:
        if browser:
            return HTMLResponse(unsubscribe_links.invalid_page(), 400, unsubscribe_links.SECURITY_HEADERS)
        return JSONResponse({"detail": "invalid unsubscribe token"}, status_code=400)
    if browser:
        return HTMLResponse(unsubscribe_links.done_page(subscription), 200, unsubscribe_links.SECURITY_HEADERS)
    return JSONResponse(Unsubscribed.model_validate({**subscription._asdict(), "subscribed": False}).model_dump())


@router.get("/users/{user_id}/contact", response_model=ContactView)
def get_contact(settings: AppSettings, user_id: UserId) -> ContactView:
    """The stored contact of a user (404 when none was stored)."""
    stored = notifications.load_contact(store.get_redis(settings), user_id)
    if not stored:
        raise HTTPException(404, f"no contact stored for user {user_id!r}")
    return ContactView.of(stored.get("email"), stored.get("webhook_url"))


router.include_router(inbox.router)


@router.get("/healthz", responses={503: {"model": Problem}})
def healthz(settings: AppSettings) -> dict[str, str]:
    """200 when Redis answers; Redis errors become the 503 above."""
    store.get_redis(settings).ping()
    return {"status": "ok", "redis": "ok"}


@router.get("/readyz", responses={503: {"model": Problem}})
def readyz(settings: AppSettings) -> dict[str, str | int]:
    """200 when Redis answers and at least one worker has a live heartbeat, else 503 with the reason."""
    try:
        workers = metrics.alive_workers(store.get_redis(settings))
    except RedisError as exc:
        raise HTTPException(503, f"Redis does not answer: {type(exc).__name__}") from None
    if not workers:
        raise HTTPException(503, "no worker is running: none has a live heartbeat in Redis")
    return {"status": "ok", "redis": "ok", "workers": workers}


@router.get("/metrics", response_class=PlainTextResponse, responses={503: {"model": Problem}})
def prometheus_metrics(settings: AppSettings) -> Response:
    """Prometheus metrics of the whole service (queues, workers, jobs, notifications), read from Redis."""
    return Response(metrics.exposition(store.get_redis(settings)), media_type=metrics.CONTENT_TYPE)
