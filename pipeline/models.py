"""SQLAlchemy 2.0 models: the metadata rows. Documents themselves live in the blob store."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")
TRIGGERS = ("schedule", "api", "cli")
MODES = ("full", "incremental")
PRIORITIES = ("high", "normal")

# JSONB on PostgreSQL, JSON text on SQLite.
JSONType = JSON().with_variant(JSONB(), "postgresql")
# BIGINT identity on PostgreSQL; SQLite only autoincrements INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def job_status(status: str, planned_at: datetime | None) -> str:
    """The status a job shows: ``planning`` while pending and its tasks are not planned yet."""
    return "planning" if status == "pending" and planned_at is None else status


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on PostgreSQL (timestamptz) and SQLite (naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use pipeline.models.utcnow()")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _status_check(column: str = "status") -> CheckConstraint:
    values = ", ".join(f"'{s}'" for s in STATUSES)
    return CheckConstraint(f"{column} IN ({values})", name="status_valid")


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSONType, datetime: UTCDateTime()}


class Company(Base):
    __tablename__ = "companies"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    external_id: Mapped[str | None] = mapped_column(String(200), unique=True)
    sync_enabled: Mapped[bool] = mapped_column(default=True, index=True)
    connector: Mapped[str] = mapped_column(String(50))
    connector_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    feature_toggles: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SyncJob(Base):
    __tablename__ = "sync_jobs"
    __table_args__ = (
        _status_check(),
        CheckConstraint(f"trigger IN ({', '.join(repr(t) for t in TRIGGERS)})", name="trigger_valid"),
        CheckConstraint(f"mode IN ({', '.join(repr(m) for m in MODES)})", name="mode_valid"),
        CheckConstraint(f"priority IN ({', '.join(repr(p) for p in PRIORITIES)})", name="priority_valid"),
        Index("ix_sync_jobs_status", "status"),
        Index("ix_sync_jobs_created_at", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    trigger: Mapped[str] = mapped_column(String(20))
    mode: Mapped[str] = mapped_column(String(20), default="full")
    priority: Mapped[str] = mapped_column(String(10), default="normal")
    status: Mapped[str] = mapped_column(String(20), default="pending")
    scope: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # One job per scheduler tick: two schedulers firing the same tick collide here.
    tick_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    total_tasks: Mapped[int] = mapped_column(default=0)
    completed_tasks: Mapped[int] = mapped_column(default=0)
    failed_tasks: Mapped[int] = mapped_column(default=0)
    cancelled_tasks: Mapped[int] = mapped_column(default=0)
    processed_records: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    error_message: Mapped[str | None] = mapped_column(Text)
    # NULL until the coordinator has inserted the job's tasks (the job shows as "planning").
    planned_at: Mapped[datetime | None]


class SyncTask(Base):
    __tablename__ = "sync_tasks"
    __table_args__ = (
        _status_check(),
        UniqueConstraint("job_id", "company_id", "resource", "partition_key"),
        Index("ix_sync_tasks_job_id_status", "job_id", "status"),
        Index("ix_sync_tasks_status_lease_until", "status", "lease_until"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sync_jobs.id", ondelete="CASCADE"))
    company_id: Mapped[int] = mapped_column(ForeignKey("companies.id", ondelete="CASCADE"), index=True)
    resource: Mapped[str] = mapped_column(String(100))
    partition_key: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    lease_until: Mapped[datetime | None]
    # Fencing token of the current claim: writes from a worker whose lease was taken over fail.
    lease_token: Mapped[str | None] = mapped_column(String(32))
    fetch_state: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    chunks: Mapped[int] = mapped_column(default=0)
    record_count: Mapped[int] = mapped_column(default=0)
    error_message: Mapped[str | None] = mapped_column(Text)
    # What kind of failure error_message describes (pipeline.error_codes.CODES).
    error_code: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("company_id", "resource", "partition_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    company_id: Mapped[int] = mapped_column(ForeignKey("companies.id", ondelete="CASCADE"))
    resource: Mapped[str] = mapped_column(String(100))
    partition_key: Mapped[str] = mapped_column(String(200))
    storage_key: Mapped[str] = mapped_column(String(600))
    checksum_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    record_count: Mapped[int]
    synced_at: Mapped[datetime] = mapped_column(default=utcnow)
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobLog(Base):
    __tablename__ = "job_log"
    __table_args__ = (
        CheckConstraint("level IN ('debug', 'info', 'warning', 'error')", name="level_valid"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sync_jobs.id", ondelete="CASCADE"), index=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("sync_tasks.id", ondelete="CASCADE"), index=True)
    level: Mapped[str] = mapped_column(String(10))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SyncCursor(Base):
    __tablename__ = "sync_cursors"
    __table_args__ = (UniqueConstraint("company_id", "resource", "partition_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    company_id: Mapped[int] = mapped_column(ForeignKey("companies.id", ondelete="CASCADE"))
    resource: Mapped[str] = mapped_column(String(100))
    partition_key: Mapped[str] = mapped_column(String(200))
    bookmark: Mapped[str]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class RateLimitBucket(Base):
    """Per-upstream token state shared by every worker on every host (no extra service)."""

    __tablename__ = "rate_limits"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    next_slot: Mapped[datetime]


class OAuthToken(Base):
    """One company's OAuth2 tokens, shared by every worker (``pipeline.oauth_tokens``).

    ``grant_fingerprint`` names the configured grant: a re-authorized connection (a new
    refresh token in the config) has another and starts over. Tokens are stored sealed
    (``{"$secret": <Fernet token>}``); ``revoked_reason`` is set once the token endpoint
    answered ``invalid_grant``.
    """

    __tablename__ = "oauth_tokens"

    company_id: Mapped[int] = mapped_column(ForeignKey("companies.id", ondelete="CASCADE"), primary_key=True)
    grant_fingerprint: Mapped[str] = mapped_column(String(64))
    access_token: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    expires_at: Mapped[datetime | None]
    refresh_token: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    revoked_reason: Mapped[str | None] = mapped_column(Text)
    refreshes: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


# Core-level handles for the statements that need them (bulk inserts, fenced updates, RETURNING).
COMPANIES = cast(Table, Company.__table__)
JOBS = cast(Table, SyncJob.__table__)
TASKS = cast(Table, SyncTask.__table__)
DATASETS = cast(Table, Dataset.__table__)
JOB_LOG = cast(Table, JobLog.__table__)
CURSORS = cast(Table, SyncCursor.__table__)
OAUTH_TOKENS = cast(Table, OAuthToken.__table__)
