"""Configuration, read once from the environment and `.env` (see `.env.example`)."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

QUEUE_NAMES: tuple[str, ...] = ("high", "default", "low")
"""Queue names in the order a worker serves them: a waiting `high` job always goes first."""
DEFAULT_WEBHOOK_SECRET = "whsec_bG9jYWwtZGV2ZWxvcG1lbnQtc2VjcmV0"
"""For local use only: settings refuse it outside ENVIRONMENT=local."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Literal["local", "production"] = "local"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

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
    smtp_starttls: bool = False
    smtp_timeout: float = Field(10.0, gt=0)

    retry_max: int = Field(4, ge=0, description="retries after the first attempt")
    retry_base_seconds: int = Field(60, ge=1)
    retry_cap_seconds: int = Field(3600, ge=1)
    retry_jitter: float = Field(0.1, ge=0, le=1, description="up to this fraction is added to each delay")

    job_timeout_seconds: int = Field(180, ge=1)
    result_ttl_seconds: int = Field(86_400, ge=0)
    failure_ttl_seconds: int = Field(7 * 86_400, ge=1)

    worker_count: int = Field(2, ge=1, description="worker processes `worker.py` keeps running (one per core)")
    worker_class: Literal["simple", "fork"] = Field(
        "simple", description="simple: jobs run in the worker process; fork: a fresh process per job (RQ's Worker)"
    )
    worker_max_jobs: int = Field(1000, ge=1, description="a simple worker process is replaced after this many jobs")
    worker_max_memory_mib: int = Field(512, ge=16, description="... or once its resident memory exceeds this")
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
    inbox_size: int = Field(100, ge=1, description="in-app notifications kept per user")

    schedule_horizon_days: int = Field(30, ge=1, description="send_at further ahead than this is refused")
    schedule_past_tolerance_seconds: int = Field(60, ge=0, description="send_at this far in the past runs at once")

    dashboard_username: str = "admin"
    dashboard_password: SecretStr | None = Field(None, description="rq-dashboard at /rq is served only with one")
    dashboard_read_only: bool = Field(False, description="hide rq-dashboard's delete/empty/requeue actions")

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

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _blank_webhook_secret_is_unset(cls, value: object) -> object:
        return DEFAULT_WEBHOOK_SECRET if value == "" else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _wait_shorter_than_socket_timeout(self) -> Settings:
        """WAIT's answer must come before the client's socket gives up on it."""
        if self.redis_wait_replicas and self.redis_wait_timeout_ms >= self.redis_socket_timeout * 1000:
            raise ValueError("REDIS_WAIT_TIMEOUT_MS must be shorter than REDIS_SOCKET_TIMEOUT")
        return self

    @model_validator(mode="after")
    def _no_default_secrets_outside_local(self) -> Settings:
        """Outside local use: API keys, a dashboard password and a webhook secret of one's own."""
        if self.environment == "local":
            return self
        password = self.dashboard_password.get_secret_value() if self.dashboard_password else ""
        unset = {
            "API_KEYS": not self.api_keys,
            "DASHBOARD_PASSWORD": not password,
            "WEBHOOK_SECRET (the default is public)": self.webhook_secret.get_secret_value() == DEFAULT_WEBHOOK_SECRET,
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
