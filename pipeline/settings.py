"""The one settings object, read from ``PIPELINE_*`` environment variables at the edge."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from apscheduler.triggers.cron import CronTrigger
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import ConfigError

_CLAIM_PATH = r"^[^.\s]+(\.[^.\s]+)*$"  # a claim name, or a dotted path into nested claims


class Settings(BaseSettings):
    """Runtime configuration. Every field maps to ``PIPELINE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_", extra="ignore", frozen=True)

    database_url: str = "sqlite:///./pipeline.db"
    broker_url: str | None = None
    blob_url: str = "file://./blobs"
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_secure: bool = False
    s3_region: str | None = None
    admin_api_key: str | None = None
    jwt_secret: str | None = None
    jwt_issuer: str = "sync-pipeline"
    # Tokens from an identity provider (RS256 / ES256, keys from its JWKS): see pipeline.auth.
    jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_claim_company: str = Field(default="company_id", pattern=_CLAIM_PATH)
    jwt_claim_role: str = Field(default="role", pattern=_CLAIM_PATH)
    jwt_claim_employee: str = Field(default="employee_id", pattern=_CLAIM_PATH)
    jwks_cache_s: float = Field(default=300.0, gt=0, le=86_400)
    jwks_refresh_min_interval_s: float = Field(default=10.0, ge=0, le=3_600)
    # Bounds on the API's own requests.
    api_max_body_bytes: int = Field(default=1_048_576, ge=1_024, le=1_073_741_824)
    api_max_event_streams: int = Field(default=100, ge=1, le=100_000)
    task_time_budget_s: float = Field(default=120.0, gt=0, le=900)
    lease_s: float | None = Field(default=None, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=50)
    # How long an outage (blob storage unreachable) is retried without spending attempts
    # before the task fails saying so. Default 6 hours.
    outage_retry_s: float = Field(default=21_600.0, gt=0)
    # Room after the fetch budget for the final merge and upload, which renew the lease.
    publish_budget_s: float = Field(default=600.0, gt=0, le=1500)
    retry_min_backoff_ms: int = Field(default=1_000, ge=0)
    retry_max_backoff_ms: int = Field(default=60_000, ge=0, le=600_000)
    schedule_cron: str = "0 * * * *"
    retention_days: int = Field(default=7, ge=0)
    # Completed task rows of finished jobs are deleted after this many days (unset: with their
    # jobs, after retention_days); job rows and counters stay. docs/capacity.md sizes it.
    task_retention_days: float | None = Field(default=None, ge=0)
    gc_grace_s: float = Field(default=3600.0, ge=0)
    pending_grace_s: float = Field(default=300.0, gt=0)
    worker_threads: int = Field(default=4, ge=1, le=64)
    queue_name: str = "sync"
    max_unfinished_jobs: int = Field(default=3, ge=1)
    # "immediate": true runs a sync before answering when its scope has at most this many tasks.
    immediate_max_tasks: int = Field(default=20, ge=0, le=1000)
    # How long an immediate sync works in the request before it leaves the rest to the fleet.
    immediate_timeout_s: float = Field(default=30.0, gt=0, le=600)
    # The bucket browser (MinIO console, SeaweedFS filer UI) the web console links objects to.
    s3_console_url: str | None = None
    metrics_port: int | None = Field(default=None, ge=1, le=65535)  # `pipeline worker` serves /metrics here
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Tenant secrets at rest (pipeline.secrets): comma-separated Fernet keys, the first encrypts.
    secrets_key: SecretStr | None = None
    # The only environment variables a connector config may name (token_env, value_env).
    connector_env_prefix: str = Field(default="CONNECTOR_", min_length=1, max_length=100,
                                      pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # Upstreams admitted on private networks (connectors.net): CIDR and host[:port], comma-separated.
    upstream_allowlist: str = ""
    upstream_max_response_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=4 * 1024 * 1024 * 1024)

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        scheme = urlparse(value).scheme.split("+")[0]
        if scheme not in {"sqlite", "postgresql", "postgres"}:
            raise ValueError(f"unsupported database scheme {scheme!r}; use sqlite:/// or postgresql://")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        scheme = urlparse(value).scheme
        if scheme not in {"amqp", "amqps"}:
            raise ValueError(f"unsupported broker scheme {scheme!r}; use amqp:// or leave unset")
        return value

    @field_validator("blob_url")
    @classmethod
    def _blob_scheme(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ValueError("s3:// URL needs a bucket name, e.g. s3://pipeline")
        elif parsed.scheme != "file":
            raise ValueError(f"unsupported blob scheme {parsed.scheme!r}; use s3://BUCKET or file:///DIR")
        return value

    @field_validator("secrets_key")
    @classmethod
    def _fernet_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        from pipeline.secrets import parse_keys

        parse_keys(value.get_secret_value())  # the message names the bad entry, never its value
        return value

    @field_validator("upstream_allowlist")
    @classmethod
    def _allowlist(cls, value: str) -> str:
        from connectors.net import NetworkPolicy

        NetworkPolicy.parse(value)
        return value

    @field_validator("connector_env_prefix")
    @classmethod
    def _not_our_own(cls, value: str) -> str:
        if "PIPELINE_".startswith(value.upper()) or value.upper().startswith("PIPELINE_"):
            raise ValueError("must not admit PIPELINE_* variables (the pipeline's own settings and secrets)")
        return value

    @field_validator("schedule_cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"not a crontab expression: {exc}") from exc
        return value

    @field_validator("jwks_url")
    @classmethod
    def _jwks_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parsed = urlparse(value)
        if parsed.scheme not in {"https", "http"} or not parsed.netloc:
            raise ValueError("must be an https:// URL of the identity provider's JWKS document")
        return value

    @model_validator(mode="after")
    def _jwks_needs_audience_and_issuer(self) -> Settings:
        if self.jwks_url is None:
            return self
        missing = [
            name
            for name, given in (
                ("PIPELINE_JWT_AUDIENCE", bool(self.jwt_audience)),
                ("PIPELINE_JWT_ISSUER", "jwt_issuer" in self.model_fields_set and bool(self.jwt_issuer)),
            )
            if not given
        ]
        if missing:
            raise ValueError(
                f"{' and '.join(missing)} must be set when PIPELINE_JWKS_URL is: a provider's token is accepted"
                " only for this API's audience and from that issuer"
            )
        return self

    @model_validator(mode="after")
    def _s3_needs_endpoint(self) -> Settings:
        if self.blob_url.startswith("s3://") and not self.s3_endpoint:
            raise ValueError("PIPELINE_S3_ENDPOINT is required when PIPELINE_BLOB_URL is s3://")
        return self

    @property
    def lease_seconds(self) -> float:
        """How long a claim holds a task: the budget plus room to publish."""
        return self.lease_s if self.lease_s is not None else self.task_time_budget_s * 2 + 30

    @property
    def message_time_limit_ms(self) -> int:
        """Dramatiq's TimeLimit: above the budget plus the final merge and upload, below RabbitMQ's
        30 min consumer_timeout."""
        return int((max(self.lease_seconds, self.task_time_budget_s + self.publish_budget_s) + 60) * 1000)

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith(("postgresql", "postgres"))


def settings_environment(settings: Settings) -> dict[str, str]:
    """``settings`` as ``PIPELINE_*`` variables: what a child process (a uvicorn or Dramatiq
    worker, a test's subprocess) needs to rebuild exactly the same settings."""
    environment = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            environment[f"PIPELINE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return environment

def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment, turning validation errors into one clear message.

    Raises:
        ConfigError: naming each bad ``PIPELINE_*`` variable and why.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            name = f"PIPELINE_{field.upper()}" if error["loc"] else "settings"
            problems.append(f"{name}: {error['msg']}")
        # Not chained: pydantic's own message echoes the input, and some inputs are secrets.
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
