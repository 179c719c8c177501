"""Errors the job functions raise, and that decide whether RQ retries them."""


class DeliveryError(Exception):
    """A notification could not be delivered."""


class TransientError(DeliveryError):
    """Worth retrying later: connection refused, timeout, SMTP 4xx, HTTP 5xx."""


class PermanentError(DeliveryError):
    """Retrying cannot help: SMTP 5xx rejection, invalid recipient, missing configuration."""


class ServiceError(Exception):
    """An error the API turns into a 4xx answer; its message is safe to show a client."""

    headers: dict[str, str] | None = None
    """Extra headers of the answer, such as `Retry-After`."""


class UnknownTaskError(ServiceError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown task {name!r}; known tasks: {', '.join(known)}")
        self.known = known


class JobNotFoundError(ServiceError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")


class JobStateError(ServiceError):
    """The job exists but is in a state that does not allow the operation."""


class TemplateError(ServiceError):
    """A notification template is unknown, or could not be rendered with the given values."""


class PartTooLargeError(TemplateError):
    """A template's part rendered to more than the bound of one part (`rendering.MAX_PART_BYTES`)."""


class TargetError(ServiceError):
    """A notification cannot be addressed: no email address or webhook URL, or a refused URL."""


class IdempotencyConflict(ServiceError):
    """The Idempotency-Key was used with another body, or its first request is still running."""


class QueueFullError(ServiceError):
    """The queue already holds `QUEUE_MAX_WAITING` waiting jobs: the client is to retry later (429)."""

    def __init__(self, queue: str, waiting: int, retry_after: int) -> None:
        super().__init__(f"queue {queue!r} is full ({waiting} jobs waiting); retry in {retry_after} s")
        self.queue = queue
        self.headers = {"Retry-After": str(retry_after)}


class NotReplicatedError(ServiceError):
    """Work was written to the primary, but fewer than `REDIS_WAIT_REPLICAS` replicas confirmed it in
    time: a failover now could lose it, so it is not reported as accepted (503)."""

    RETRY_AFTER_SECONDS = 1

    def __init__(self, confirmed: int, wanted: int) -> None:
        super().__init__(
            f"not accepted: {confirmed} of {wanted} Redis replicas confirmed the write in time. The job may"
            " exist; retrying with the same Idempotency-Key is safe (it is then created at most once)"
        )
        self.headers = {"Retry-After": str(self.RETRY_AFTER_SECONDS)}
