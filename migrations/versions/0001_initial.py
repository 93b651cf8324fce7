"""Initial schema: companies, sync jobs and tasks, datasets, job log, cursors, rate limits.

Revision ID: 0001
Revises:
Create Date: 2025-11-23

Names follow ``pipeline.models.Base.metadata``'s naming convention, spelled out with ``op.f``
so this revision does not depend on it. The column types shared with the models (JSONB on
PostgreSQL / JSON on SQLite, BIGINT ids / SQLite INTEGER PRIMARY KEY, timezone-aware UTC
timestamps) are imported from ``pipeline.models`` so both dialects get what the models expect.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pipeline.models

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = pipeline.models.JSONType
BigId = pipeline.models.BigId
UTCDateTime = pipeline.models.UTCDateTime

# Frozen copies of the models' allowed values: a later change to them is a new revision.
STATUS_VALID = "status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')"


def upgrade() -> None:
    op.create_table(
        "companies",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=True),
        sa.Column("sync_enabled", sa.Boolean(), nullable=False),
        sa.Column("connector", sa.String(length=50), nullable=False),
        sa.Column("connector_config", JSONType, nullable=False),
        sa.Column("feature_toggles", JSONType, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_companies")),
        sa.UniqueConstraint("external_id", name=op.f("uq_companies_external_id")),
    )
    op.create_index(op.f("ix_companies_sync_enabled"), "companies", ["sync_enabled"])

    op.create_table(
        "sync_jobs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("trigger", sa.String(length=20), nullable=False),
        sa.Column("mode", sa.String(length=20), nullable=False),
        sa.Column("priority", sa.String(length=10), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("scope", JSONType, nullable=False),
        sa.Column("tick_key", sa.String(length=64), nullable=True),
        sa.Column("total_tasks", sa.Integer(), nullable=False),
        sa.Column("completed_tasks", sa.Integer(), nullable=False),
        sa.Column("failed_tasks", sa.Integer(), nullable=False),
        sa.Column("cancelled_tasks", sa.Integer(), nullable=False),
        sa.Column("processed_records", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.CheckConstraint(STATUS_VALID, name=op.f("ck_sync_jobs_status_valid")),
        sa.CheckConstraint("trigger IN ('schedule', 'api', 'cli')", name=op.f("ck_sync_jobs_trigger_valid")),
        sa.CheckConstraint("mode IN ('full', 'incremental')", name=op.f("ck_sync_jobs_mode_valid")),
        sa.CheckConstraint("priority IN ('high', 'normal')", name=op.f("ck_sync_jobs_priority_valid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_jobs")),
        sa.UniqueConstraint("tick_key", name=op.f("uq_sync_jobs_tick_key")),
    )
    op.create_index(op.f("ix_sync_jobs_status"), "sync_jobs", ["status"])
    op.create_index(op.f("ix_sync_jobs_created_at"), "sync_jobs", ["created_at"])

    op.create_table(
        "sync_tasks",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("company_id", BigId, nullable=False),
        sa.Column("resource", sa.String(length=100), nullable=False),
        sa.Column("partition_key", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("lease_token", sa.String(length=32), nullable=True),
        sa.Column("fetch_state", JSONType, nullable=True),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("record_count", sa.Integer(), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint(STATUS_VALID, name=op.f("ck_sync_tasks_status_valid")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["sync_jobs.id"], name=op.f("fk_sync_tasks_job_id_sync_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["company_id"],
            ["companies.id"],
            name=op.f("fk_sync_tasks_company_id_companies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_tasks")),
        sa.UniqueConstraint(
            "job_id",
            "company_id",
            "resource",
            "partition_key",
            name=op.f("uq_sync_tasks_job_id_company_id_resource_partition_key"),
        ),
    )
    op.create_index(op.f("ix_sync_tasks_company_id"), "sync_tasks", ["company_id"])
    op.create_index(op.f("ix_sync_tasks_job_id_status"), "sync_tasks", ["job_id", "status"])
    op.create_index(op.f("ix_sync_tasks_status_lease_until"), "sync_tasks", ["status", "lease_until"])

    op.create_table(
        "datasets",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("company_id", BigId, nullable=False),
        sa.Column("resource", sa.String(length=100), nullable=False),
        sa.Column("partition_key", sa.String(length=200), nullable=False),
        sa.Column("storage_key", sa.String(length=600), nullable=False),
        sa.Column("checksum_sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("record_count", sa.Integer(), nullable=False),
        sa.Column("synced_at", UTCDateTime(), nullable=False),
        sa.Column("changed_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["company_id"],
            ["companies.id"],
            name=op.f("fk_datasets_company_id_companies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint(
            "company_id",
            "resource",
            "partition_key",
            name=op.f("uq_datasets_company_id_resource_partition_key"),
        ),
    )

    op.create_table(
        "job_log",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("task_id", BigId, nullable=True),
        sa.Column("level", sa.String(length=10), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", JSONType, nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "level IN ('debug', 'info', 'warning', 'error')", name=op.f("ck_job_log_level_valid")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["sync_jobs.id"], name=op.f("fk_job_log_job_id_sync_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["sync_tasks.id"], name=op.f("fk_job_log_task_id_sync_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_log")),
    )
    op.create_index(op.f("ix_job_log_job_id"), "job_log", ["job_id"])
    op.create_index(op.f("ix_job_log_task_id"), "job_log", ["task_id"])

    op.create_table(
        "sync_cursors",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("company_id", BigId, nullable=False),
        sa.Column("resource", sa.String(length=100), nullable=False),
        sa.Column("partition_key", sa.String(length=200), nullable=False),
        sa.Column("bookmark", sa.String(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["company_id"],
            ["companies.id"],
            name=op.f("fk_sync_cursors_company_id_companies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_cursors")),
        sa.UniqueConstraint(
            "company_id",
            "resource",
            "partition_key",
            name=op.f("uq_sync_cursors_company_id_resource_partition_key"),
        ),
    )

    op.create_table(
        "rate_limits",
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("next_slot", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_rate_limits")),
    )


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes and constraints with it.
    for table in (
        "rate_limits",
        "sync_cursors",
        "job_log",
        "datasets",
        "sync_tasks",
        "sync_jobs",
        "companies",
    ):
        op.drop_table(table)
