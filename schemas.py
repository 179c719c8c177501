"""Pydantic models for requests, answers and task arguments: the edge's contract."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, EmailStr, Field, JsonValue

Priority = Literal["high", "default", "low"]
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
"""RQ's own ids (uuid4 hex) and rq-scheduler's (uuid4 with dashes) both match."""


def _single_line(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("must not contain line breaks")
    return value


HeaderText = Annotated[str, Field(min_length=1, max_length=998), AfterValidator(_single_line)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmailArgs(StrictModel):
    """Arguments of the `send_email` task."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    to: EmailStr = Field(validation_alias=AliasChoices("to", "recipient_email"), examples=["ann@example.com"])
    subject: HeaderText
    body: str = Field(max_length=100_000)


class NoArgs(StrictModel):
    """Arguments of a task that takes none."""


class SendEmailRequest(EmailArgs):
    priority: Priority = "default"


class JobRequest(StrictModel):
    task: str = Field(min_length=1, max_length=100, examples=["send_email"])
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)
    priority: Priority = "default"


class JobAccepted(BaseModel):
    job_id: str
    status: str
    queue: str
    status_url: str


class JobError(BaseModel):
    type: str
    message: str


class JobView(BaseModel):
    id: str
    task: str | None
    status: str
    queue: str
    created_at: datetime | None
    enqueued_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    retries_left: int | None
    result: Any = None
    error: JobError | None = None


class JobPage(BaseModel):
    total: int
    offset: int
    limit: int
    jobs: list[JobView]


class Problem(BaseModel):
    """The JSON body of every error answer."""

    detail: Any
