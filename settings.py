"""Configuration, read once from the environment and `.env` (see `.env.example`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

QUEUE_NAMES: tuple[str, ...] = ("high", "default", "low")
"""Queue names in the order a worker serves them: a waiting `high` job always goes first."""
DEFAULT_WEBHOOK_SECRET = "whsec_bG9jYWwtZGV2ZWxvcG1lbnQtc2VjcmV0"
"""For local use only: settings refuse it outside ENVIRONMENT=local."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Literal["local", "production"] = "local"

    redis_url: str = "redis://localhost:6379/0"
    redis_socket_timeout: float = Field(0.5, gt=0, description="seconds; bounds every API call to Redis")
    redis_appendfsync: Literal["always", "everysec", "no"] = "everysec"

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

    worker_count: int = Field(2, ge=1)

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

    @model_validator(mode="after")
    def _no_default_secrets_outside_local(self) -> Settings:
        if self.environment != "local" and self.webhook_secret.get_secret_value() == DEFAULT_WEBHOOK_SECRET:
            raise ValueError("WEBHOOK_SECRET must be set outside local use; the default is public")
        return self

    @property
    def smtp_configured(self) -> bool:
        return bool(self.smtp_host)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests call `get_settings.cache_clear()` after changing the env."""
    return Settings()
