"""Pydantic models for requests, answers and task arguments: the edge's contract."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    JsonValue,
    StrictBool,
    field_validator,
    model_validator,
)

from herald.infra.patterns import (
    ID_PATTERN,
    TEMPLATE_NAME_PATTERN,
    TOPIC_PATTERN,
    WALL_CLOCK_TIME_PATTERN,
)
from herald.infra.statuses import DeliveryStatus
from herald.notify import quiet_hours
from settings import Settings

Priority = Literal["high", "default", "low"]


def _single_line(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("must not contain line breaks")
    return value


HeaderText = Annotated[str, Field(min_length=1, max_length=998), AfterValidator(_single_line)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


RECIPIENT_ALIASES = AliasChoices("to", "email")
"""`to`, as in `POST /send-email`; `email` is its old name in notifications and contacts, still accepted."""


def one_recipient(data: Any) -> Any:
    """`to` and `email` together only when they name the same address; then `to` alone goes on."""
    if not (isinstance(data, dict) and "to" in data and "email" in data):
        return data
    if data["to"] != data["email"]:
        raise ValueError("to and email name the same recipient (email is its old name): send only to")
    return {name: value for name, value in data.items() if name != "email"}


def recipient_field(description: str) -> Any:
    """The recipient address field: optional, named `to`, read from `email` too."""
    return Field(None, validation_alias=RECIPIENT_ALIASES, description=f"{description} (`email` is accepted too)")


class EmailArgs(StrictModel):
    """Arguments of the `send_email` task."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    to: EmailStr = Field(validation_alias=AliasChoices("to", "recipient_email"), examples=["ann@example.com"])
    subject: HeaderText
    body: str = Field(max_length=100_000)


class NoArgs(StrictModel):
    """Arguments of a task that takes none."""


class AwaitArgs(StrictModel):
    """Arguments of the `await_completion` task: what the person or outside system is to do."""

    description: str = Field(min_length=1, max_length=2000, examples=["Approve refund R-17"])


class Schedule(BaseModel):
    """When to run: now (neither field), after `delay_seconds`, or at `send_at` (with a timezone)."""

    delay_seconds: float | None = Field(None, ge=0, description="run this many seconds from now")
    send_at: AwareDatetime | None = Field(None, description="run at this time (ISO-8601 with a timezone)")

    @model_validator(mode="after")
    def _one_way(self) -> Schedule:
        if self.delay_seconds is not None and self.send_at is not None:
            raise ValueError("give either delay_seconds or send_at, not both")
        try:
            self.due_at()
        except OverflowError:  # a delay beyond the year 9999, or infinite
            raise ValueError("the due time is out of range") from None
        return self

    def schedule_problem(self, settings: Settings) -> str | None:
        """Why the due time is refused with these settings (beyond `SCHEDULE_HORIZON_DAYS`, or too far in
        the past), or None. Checked where the settings are at hand (`routes.within_horizon`), not here."""
        due, now = self.due_at(), datetime.now(UTC)
        if due and due > now + timedelta(days=settings.schedule_horizon_days):
            return f"must be within {settings.schedule_horizon_days} days from now"
        if due and due < now - timedelta(seconds=settings.schedule_past_tolerance_seconds):
            return f"send_at is more than {settings.schedule_past_tolerance_seconds} s in the past"
        return None

    def due_at(self) -> datetime | None:
        """The due time in UTC, or None to run at once (a slightly past `send_at` is due at once)."""
        if self.delay_seconds is not None:
            return datetime.now(UTC) + timedelta(seconds=self.delay_seconds)
        return self.send_at.astimezone(UTC) if self.send_at else None


class SendEmailRequest(EmailArgs, Schedule):
    """One email; the example is what "Try it out" in /docs sends (a body built from every field would give
    both `delay_seconds` and `send_at`, a 422)."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "examples": [{"to": "ann@example.com", "subject": "Welcome", "body": "Thanks for signing up."}]
        },
    )

    priority: Priority = "default"


class SendEmailBatch(StrictModel):
    emails: list[EmailArgs] = Field(min_length=1, max_length=1000)
    priority: Priority = "default"


class JobsAccepted(BaseModel):
    jobs: list[JobAccepted]


class JobRequest(StrictModel, Schedule):
    task: str = Field(min_length=1, max_length=100, examples=["send_email"])
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)
    priority: Priority = "default"


class JobAccepted(BaseModel):
    job_id: str
    status: str
    queue: str
    status_url: str
    scheduled_for: datetime | None = None


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
    scheduled_for: datetime | None = None
    result: Any = None
    error: JobError | None = None


class JobPage(BaseModel):
    total: int
    offset: int
    limit: int
    jobs: list[JobView]


class PeriodicRun(BaseModel):
    """The job one run of a periodic job enqueued."""

    job_id: str
    status: str
    """The job's status; `expired` once RQ has deleted the job (after its result or failure TTL)."""
    run_at: datetime | None = None
    """The time the run was due (not when it was enqueued)."""
    enqueued_at: datetime | None = None
    ended_at: datetime | None = None


class PeriodicJobView(BaseModel):
    name: str
    task: str
    args: dict[str, Any]
    priority: Priority
    cron: str | None = Field(None, description="cron expression, in the scheduler's local time")
    interval_seconds: int | None = None
    last_run: PeriodicRun | None
    next_run: datetime


class PeriodicJobList(BaseModel):
    schedulers: int
    """Scheduler processes alive (heartbeat within RQ's cron scheduler TTL); 0: no periodic job runs."""
    jobs: list[PeriodicJobView]


class Problem(BaseModel):
    """The JSON body of every error answer."""

    detail: Any


ChannelName = Literal["email", "webhook", "in_app"]
NotificationPriority = Literal["urgent", "high", "normal", "low"]
SkipReason = Literal["opted_out"]
QUEUE_OF_PRIORITY: dict[str, Priority] = {"urgent": "high", "high": "high", "normal": "default", "low": "low"}

Token = Annotated[str, Field(pattern=ID_PATTERN)]
Topic = Annotated[str, Field(pattern=TOPIC_PATTERN, examples=["marketing"])]
"""What a notification is about (`general`, `marketing`, `security`): users opt out per topic and channel."""
DigestKey = Annotated[str, Field(pattern=TOPIC_PATTERN, examples=["daily-orders"])]
MAX_DIGEST_WINDOW_SECONDS = 86_400


class NotificationRequest(StrictModel, Schedule):
    user_id: Token
    channels: list[ChannelName] = Field(min_length=1, max_length=3)
    title: HeaderText | None = None
    body: str | None = Field(None, max_length=100_000)
    template: str | None = Field(None, pattern=TEMPLATE_NAME_PATTERN)
    context: dict[str, JsonValue] = Field(default_factory=dict)
    priority: NotificationPriority = "normal"
    expires_at: AwareDatetime | None = None
    to: EmailStr | None = recipient_field("email recipient; defaults to the user's stored address")
    webhook_url: str | None = Field(None, max_length=2048, description="defaults to the user's stored URL")
    source_entity_type: Token | None = None
    source_entity_id: Token | None = None
    topic: Topic = Field("general", description="the user's preferences for this topic apply")
    required: StrictBool = Field(False, description="sent whatever the user opted out of (security alerts, say)")
    digest_key: DigestKey | None = Field(
        None, description="gather this user's notifications of the same key and channel into one delivery"
    )
    digest_window_seconds: int | None = Field(
        None, ge=1, le=MAX_DIGEST_WINDOW_SECONDS, description="how long the first one of a digest waits for others"
    )

    _one_recipient = model_validator(mode="before")(one_recipient)

    @model_validator(mode="after")
    def _digest_alone(self) -> NotificationRequest:
        """A digest decides when its notifications go out: no schedule of their own, and never urgent."""
        if (self.digest_key is None) != (self.digest_window_seconds is None):
            raise ValueError("give digest_key and digest_window_seconds together")
        if self.digest_key is not None and (self.delay_seconds is not None or self.send_at is not None):
            raise ValueError("a digested notification goes out at the end of its window: no delay_seconds or send_at")
        if self.digest_key is not None and self.priority == "urgent":
            raise ValueError("an urgent notification goes out at once and cannot be digested")
        return self

    @model_validator(mode="after")
    def _content_and_channels(self) -> NotificationRequest:
        if len(set(self.channels)) != len(self.channels):
            raise ValueError("channels must not repeat")
        if self.template is None and (self.title is None or self.body is None):
            raise ValueError("give title and body, or a template (with its context)")
        if self.template is not None and (self.title is not None or self.body is not None):
            raise ValueError("give title and body, or a template, not both")
        return self


class UserContact(StrictModel):
    """Where a user's email and webhook notifications go when a request names no target."""

    to: EmailStr | None = recipient_field("email address")
    webhook_url: str | None = Field(None, max_length=2048)

    _one_recipient = model_validator(mode="before")(one_recipient)


class ContactView(BaseModel):
    """A stored contact; `email` repeats `to` for readers written before the field was renamed."""

    to: EmailStr | None
    webhook_url: str | None
    email: EmailStr | None = Field(description="the same as `to`, its old name", json_schema_extra={"deprecated": True})

    @classmethod
    def of(cls, to: str | None, webhook_url: str | None) -> ContactView:
        return cls(to=to, webhook_url=webhook_url, email=to)


class DeliveryAccepted(BaseModel):
    channel: ChannelName
    delivery_id: str
    job_id: str
    status: DeliveryStatus
    skip_reason: SkipReason | None = None
    scheduled_for: datetime | None = None
    digest_delivery_id: str | None = None


class NotificationAccepted(BaseModel):
    notification_id: str
    correlation_id: str
    status_url: str
    deliveries: list[DeliveryAccepted]


class DeliveryView(BaseModel):
    delivery_id: str
    channel: ChannelName
    status: DeliveryStatus
    job_id: str
    attempts: int
    max_attempts: int
    next_retry_at: datetime | None = None
    last_error: str | None = None
    error_category: Literal["transient", "permanent"] | None = None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None = None
    skip_reason: SkipReason | None = Field(None, description="why a `skipped` delivery was not sent")
    scheduled_for: datetime | None = Field(None, description="when a `scheduled` delivery is due (UTC)")
    digest_delivery_id: str | None = Field(None, description="the digest a `digested` delivery went into")


class NotificationView(BaseModel):
    notification_id: str
    user_id: str
    title: str
    priority: NotificationPriority
    correlation_id: str
    created_at: datetime
    scheduled_for: datetime | None = None
    expires_at: datetime | None = None
    source_entity_type: str | None = None
    source_entity_id: str | None = None
    topic: str = "general"
    required: bool = False
    digest_key: str | None = None
    digest_window_seconds: int | None = None
    deliveries: list[DeliveryView]


class DigestView(BaseModel):
    """A digest: the notifications gathered so far or sent in it, and its one delivery."""

    delivery_id: str
    user_id: str
    channel: ChannelName
    digest_key: str
    status: Literal["open", "closed"] = Field(description="`open` while notifications can still join it")
    opened_at: datetime
    window_ends_at: datetime = Field(description="when it closes and is sent (a quiet-hours end, if later)")
    notification_ids: list[str] = Field(description="every notification that joined it, in arrival order")
    sent_notification_ids: list[str] | None = Field(
        None, description="those in the message, once closed (not canceled, expired or opted out)"
    )
    delivery: DeliveryView


WallClockTime = Annotated[str, Field(pattern=WALL_CLOCK_TIME_PATTERN, examples=["22:00"])]
"""`HH:MM`, or `HH:MM:SS`, on a 24-hour clock."""


class QuietHours(StrictModel):
    """A daily window, in the user's time zone, in which only urgent notifications go out at once."""

    start: WallClockTime
    end: WallClockTime = Field(examples=["07:00"])
    timezone: str = Field(max_length=64, examples=["Europe/Berlin"], description="an IANA time zone name")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        if not quiet_hours.is_known_zone(name):
            raise ValueError(f"unknown time zone {name!r}: give an IANA name such as Europe/Berlin or UTC")
        return name


class Preferences(StrictModel):
    """What a user wants to receive: channels on or off, per topic exceptions, quiet hours.

    A channel missing from `channels` is on; a topic's channel missing from `topics` follows `channels`.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "channels": {"email": True, "webhook": True, "in_app": True},
                    "topics": {"marketing": {"email": False}},
                    "quiet_hours": {"start": "22:00", "end": "07:00", "timezone": "Europe/Berlin"},
                }
            ]
        },
    )

    channels: dict[ChannelName, StrictBool] = Field(default_factory=dict)
    topics: dict[Topic, dict[ChannelName, StrictBool]] = Field(default_factory=dict, max_length=100)
    quiet_hours: QuietHours | None = None


class Unsubscribed(BaseModel):
    """The answer to a one-click unsubscribe: this user gets no more of this topic on this channel."""

    user_id: str
    topic: str
    channel: ChannelName
    subscribed: bool
