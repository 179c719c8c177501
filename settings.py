"""Configuration, read once from the environment and `.env` (see `.env.example`)."""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

QUEUE_NAMES: tuple[str, ...] = ("high", "default", "low")
"""Queue names in the order a worker serves them: a waiting `high` job always goes first."""
DEFAULT_WEBHOOK_SECRET = "whsec_bG9jYWwtZGV2ZWxvcG1lbnQtc2VjcmV0"
"""For local use only: settings refuse it outside ENVIRONMENT=local."""
DEFAULT_UNSUBSCRIBE_SECRET = "local-development-unsubscribe-secret"
"""Signs unsubscribe links in local use only: settings refuse it outside ENVIRONMENT=local."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", hide_input_in_errors=True
    )  # a refusal prints what is wrong, never the values given: they hold the secrets

    environment: Literal["local", "production"] = "local"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["auto", "console", "json"] = Field(
        "auto", description="auto: console when stderr is a terminal or ENVIRONMENT=local, else json"
    )

    redis_url: str = "redis://localhost:6379/0"
    redis_socket_timeout: float = Field(0.5, gt=0, description="seconds; bounds every API call to Redis")
    redis_appendfsync: Literal["always", "everysec", "no"] = "everysec"
    redis_sentinel_password: SecretStr | None = Field(None, description="for sentinels that require one")
    redis_wait_replicas: int = Field(
        0, ge=0, description="work is accepted (202) only once this many replicas have it (Redis WAIT)"
    )
    redis_wait_timeout_ms: int = Field(200, ge=1, description="how long an accepting write waits for them")

    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "notifications@localhost"
    smtp_starttls: bool = Field(False, description="upgrade a plain connection with STARTTLS (usually port 587)")
    smtp_ssl: bool = Field(False, description="implicit TLS from the first byte, SMTPS (usually port 465)")
    smtp_ca_file: str | None = Field(
        None, description="PEM file of the CAs that may sign the SMTP server's certificate; default: the system's"
    )
    smtp_timeout: float = Field(10.0, gt=0)

    retry_max: int = Field(4, ge=0, description="retries after the first attempt")
    retry_base_seconds: int = Field(60, ge=1)
    retry_cap_seconds: int = Field(3600, ge=1)
    retry_jitter: float = Field(0.1, ge=0, le=1, description="up to this fraction is added to each delay")

    job_timeout_seconds: int = Field(180, ge=1)
    result_ttl_seconds: int = Field(86_400, ge=0)
    failure_ttl_seconds: int = Field(7 * 86_400, ge=1)

    worker_count: int = Field(
        1,
        ge=1,
        description="worker processes `worker.py` keeps running (1: under a supervisor that holds none of its"
        " memory; more: RQ's WorkerPool); one runs network-bound deliveries in its threads, CPU-bound jobs want"
        " one per core (with WORKER_THREADS=1)",
    )
    worker_class: Literal["simple", "fork"] = Field(
        "simple", description="simple: jobs run in the worker process; fork: a fresh process per job (RQ's Worker)"
    )
    worker_threads: int = Field(
        24,
        ge=1,
        description="jobs each simple worker process runs at once, in threads: deliveries in flight per host ="
        " WORKER_COUNT x WORKER_THREADS; the default covers SMTP_CONCURRENCY + 4 webhook hosts x"
        " WEBHOOK_HOST_CONCURRENCY; 1: one job at a time",
    )
    worker_max_jobs: int = Field(100_000, ge=1, description="a simple worker process is replaced after this many jobs")
    worker_max_memory_mib: int = Field(
        512, ge=16, description="... or once its resident memory has exceeded this (its peak, read after each job)"
    )
    api_workers: int = Field(2, ge=1, description="uvicorn worker processes of the API (one per core)")
    worker_ttl_seconds: int = Field(20, ge=2, description="worker heartbeat TTL; idle workers poll for it")
    worker_maintenance_interval_seconds: int = Field(10, ge=1, description="how often a worker cleans registries")
    job_heartbeat_seconds: int = Field(5, ge=1, description="how often a worker refreshes its running job's heartbeat")
    job_heartbeat_grace_seconds: int = Field(
        15, ge=1, description="a running job whose heartbeat is this late counts as abandoned (its worker died)"
    )
    recovery_sweep_seconds: float = Field(5.0, gt=0, description="how often the scheduler looks for abandoned jobs")

    scheduler_interval_seconds: float = Field(1.0, gt=0, le=60)
    email_max_attempts: int = Field(5, ge=1)
    webhook_max_attempts: int = Field(5, ge=1)
    in_app_max_attempts: int = Field(1, ge=1)

    webhook_secret: SecretStr = Field(
        SecretStr(DEFAULT_WEBHOOK_SECRET), description="Standard Webhooks secret, whsec_<base64>"
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0)
    webhook_allow_private: bool = Field(False, description="allow private, loopback and link-local targets")
    unsubscribe_secret: SecretStr = Field(
        SecretStr(DEFAULT_UNSUBSCRIBE_SECRET), description="HMAC key of the one-click unsubscribe links in email"
    )
    public_base_url: str = Field(
        "http://127.0.0.1:8000",
        max_length=300,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="where recipients reach the API: the start of the unsubscribe links in email",
    )
    webhook_host_concurrency: int = Field(
        4, ge=1, description="deliveries to one webhook host at a time (queued or running); the rest wait"
    )
    smtp_concurrency: int = Field(8, ge=1, description="deliveries to the SMTP server at a time; the rest wait")
    inbox_size: int = Field(100, ge=1, description="in-app notifications kept per user")
    inbox_retention_days: int = Field(
        90, ge=1, description="the daily purge_expired job removes in-app notifications older than this"
    )

    schedule_horizon_days: int = Field(30, ge=1, description="send_at further ahead than this is refused")
    schedule_past_tolerance_seconds: int = Field(60, ge=0, description="send_at this far in the past runs at once")

    dashboard_username: str = "admin"
    dashboard_password: SecretStr | None = Field(None, description="rq-dashboard at /rq is served only with one")
    dashboard_read_only: bool = Field(False, description="hide rq-dashboard's delete/empty/requeue actions")

    api_key: SecretStr | None = Field(None, description="one API key; with API_KEYS too, any of them is accepted")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="when set, every route but health, metrics, docs and /rq needs one"
    )
    max_body_bytes: int = Field(65_536, ge=1, description="larger request bodies are refused with 413")
    queue_max_waiting: int = Field(100_000, ge=1, description="a queue holding this many waiting jobs takes no more")
    queue_full_retry_after_seconds: int = Field(5, ge=1, description="Retry-After of the 429 for a full queue")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: object) -> object:
        """`API_KEYS` as a JSON list or comma-separated; blank entries are dropped."""
        if not isinstance(value, str):
            return value
        items = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
        return [str(item).strip() for item in items if str(item).strip()]

    @field_validator("api_key", mode="before")
    @classmethod
    def _blank_api_key_is_unset(cls, value: object) -> object:
        return (value.strip() or None) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _api_key_joins_api_keys(self) -> Settings:
        """`API_KEY` is one more accepted key: everything that reads `api_keys` sees the union."""
        if self.api_key and self.api_key not in self.api_keys:
            self.api_keys = [*self.api_keys, self.api_key]
        return self

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _blank_webhook_secret_is_unset(cls, value: object) -> object:
        return DEFAULT_WEBHOOK_SECRET if value == "" else value

    @field_validator("unsubscribe_secret", mode="before")
    @classmethod
    def _blank_unsubscribe_secret_is_unset(cls, value: object) -> object:
        return DEFAULT_UNSUBSCRIBE_SECRET if value == "" else value

    @field_validator("public_base_url", mode="after")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_case_format(cls, value: object) -> object:
        """`LOG_FORMAT=JSON` is json; a blank `LOG_FORMAT=` is unset (auto)."""
        return (value.strip().lower() or "auto") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_way_of_smtp_tls(self) -> Settings:
        if self.smtp_ssl and self.smtp_starttls:
            raise ValueError("SMTP_SSL and SMTP_STARTTLS exclude each other: SMTPS is TLS from the start")
        return self

    @model_validator(mode="after")
    def _wait_shorter_than_socket_timeout(self) -> Settings:
        """WAIT's answer must come before the client's socket gives up on it."""
        if self.redis_wait_replicas and self.redis_wait_timeout_ms >= self.redis_socket_timeout * 1000:
            raise ValueError("REDIS_WAIT_TIMEOUT_MS must be shorter than REDIS_SOCKET_TIMEOUT")
        return self

    @model_validator(mode="after")
    def _no_default_secrets_outside_local(self) -> Settings:
        """Outside local use: API keys, a dashboard password, and webhook and unsubscribe secrets of one's own."""
        if self.environment == "local":
            return self
        password = self.dashboard_password.get_secret_value() if self.dashboard_password else ""
        unset = {
            "API_KEYS (or API_KEY)": not self.api_keys,
            "DASHBOARD_PASSWORD": not password,
            "WEBHOOK_SECRET (the default is public)": self.webhook_secret.get_secret_value() == DEFAULT_WEBHOOK_SECRET,
            "UNSUBSCRIBE_SECRET (the default is public)": (
                self.unsubscribe_secret.get_secret_value() == DEFAULT_UNSUBSCRIBE_SECRET
            ),
        }
        if missing := [name for name, is_unset in unset.items() if is_unset]:
            raise ValueError(f"ENVIRONMENT={self.environment} requires {', '.join(missing)}")
        return self

    @property
    def smtp_configured(self) -> bool:
        return bool(self.smtp_host)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests call `get_settings.cache_clear()` after changing the env."""
    return Settings()


def settings_problems(error: ValidationError) -> str:
    """What is wrong with the settings, in one line (the values themselves are never shown)."""
    messages = (problem["msg"].removeprefix("Value error, ") for problem in error.errors(include_url=False))
    return "; ".join(messages)


def settings_or_exit() -> Settings:
    """`get_settings()` for an entry point: bad settings end the process with one `error:` line, no traceback."""
    try:
        return get_settings()
    except ValidationError as error:
        print(f"error: {settings_problems(error)}", file=sys.stderr)
        raise SystemExit(2) from None
