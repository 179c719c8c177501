"""The HTTP producer: validate the request, call one function in `queues`, shape the answer."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.job import Job, JobStatus

import queues
from dashboard import mount_dashboard
from exceptions import JobNotFoundError, JobStateError, UnknownTaskError
from schemas import (
    JOB_ID_PATTERN,
    EmailArgs,
    JobAccepted,
    JobPage,
    JobRequest,
    JobView,
    Priority,
    Problem,
    SendEmailRequest,
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


@app.exception_handler(JobNotFoundError)
async def job_not_found(request: Request, exc: JobNotFoundError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


@app.exception_handler(JobStateError)
async def job_state_conflict(request: Request, exc: JobStateError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=409)


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
def send_email(request: SendEmailRequest) -> JobAccepted:
    """Queue one email, now or later; a worker sends it, retrying transient failures with backoff."""
    arguments = request.model_dump(include=set(EmailArgs.model_fields))
    return _enqueue("send_email", arguments, request.priority, request.due_at())


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


@app.get("/healthz", responses={503: {"model": Problem}})
def healthz() -> dict[str, str]:
    """200 when Redis answers; Redis errors become the 503 above."""
    queues.get_redis().ping()
    return {"status": "ok", "redis": "ok"}


mount_dashboard(app, get_settings())
