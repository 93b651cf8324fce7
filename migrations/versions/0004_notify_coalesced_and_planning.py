"""Coalesced job events, and ``sync_jobs.planned_at`` for jobs the coordinator has not planned yet.

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-01

``planned_at`` is NULL while a job waits for the ``coordinate_sync`` actor to insert its tasks
(its status shows as ``planning``); jobs planned before this revision are marked planned.

Events (PostgreSQL only; SQLite polls). Every NOTIFY-issuing commit takes PostgreSQL's global
notify lock, so a transaction now sends what listeners need and no more:

- a task transition (``status`` or ``chunks`` changed) is held in a transaction-local setting
  instead of being sent at once; several updates of one task in one transaction keep only its
  last state;
- a job change (status, counters, planned) sends ONE notification, carrying the held task event
  of the same job in its ``task`` key — the publish (task completed + job counters) and the
  claim that starts a job are one notification each;
- a held task event that no job change picked up is sent at commit by a deferred constraint
  trigger (a claim, a chunk step), or just before the next task's event is held.

Payload fields are those of revision 0002 (the job's ``status`` reads ``planning`` until it is
planned); each stays far below NOTIFY's 8,000-byte limit, errors being cut to 500 characters.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pipeline.models

revision: str = "0004"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "job_events"
HELD = "pipeline.held_task_event"

TASK_FUNCTION = f"""
CREATE OR REPLACE FUNCTION notify_task_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    held text := current_setting('{HELD}', true);
BEGIN
    IF held IS NOT NULL AND held <> '' AND (held::jsonb ->> 'task_id')::bigint <> NEW.id THEN
        PERFORM pg_notify('{CHANNEL}', held);
    END IF;
    PERFORM set_config('{HELD}', json_build_object(
        'kind', 'task',
        'xid', pg_current_xact_id()::text,
        'job_id', NEW.job_id,
        'task_id', NEW.id,
        'company_id', NEW.company_id,
        'resource', NEW.resource,
        'partition', NEW.partition_key,
        'status', NEW.status,
        'attempts', NEW.attempts,
        'chunks', NEW.chunks,
        'record_count', NEW.record_count,
        'error', left(NEW.error_message, 500)
    )::text, true);
    RETURN NULL;
END
$$
"""

FLUSH_FUNCTION = f"""
CREATE OR REPLACE FUNCTION flush_task_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    held text := current_setting('{HELD}', true);
BEGIN
    IF held IS NOT NULL AND held <> '' THEN
        PERFORM pg_notify('{CHANNEL}', held);
        PERFORM set_config('{HELD}', '', true);
    END IF;
    RETURN NULL;
END
$$
"""

JOB_FUNCTION = f"""
CREATE OR REPLACE FUNCTION notify_job_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    held text := current_setting('{HELD}', true);
    payload jsonb := jsonb_build_object(
        'kind', 'job',
        'xid', pg_current_xact_id()::text,
        'job_id', NEW.id,
        'status', CASE WHEN NEW.status = 'pending' AND NEW.planned_at IS NULL THEN 'planning' ELSE NEW.status END,
        'total_tasks', NEW.total_tasks,
        'completed_tasks', NEW.completed_tasks,
        'failed_tasks', NEW.failed_tasks,
        'cancelled_tasks', NEW.cancelled_tasks,
        'processed_records', NEW.processed_records,
        'started_at', NEW.started_at,
        'completed_at', NEW.completed_at,
        'error', left(NEW.error_message, 500)
    );
BEGIN
    IF held IS NOT NULL AND held <> '' THEN
        IF held::jsonb ->> 'job_id' = NEW.id::text THEN
            payload := payload || jsonb_build_object('task', held::jsonb);
        ELSE
            PERFORM pg_notify('{CHANNEL}', held);
        END IF;
        PERFORM set_config('{HELD}', '', true);
    END IF;
    PERFORM pg_notify('{CHANNEL}', payload::text);
    RETURN NULL;
END
$$
"""

TASK_CHANGED = "OLD.status IS DISTINCT FROM NEW.status OR OLD.chunks IS DISTINCT FROM NEW.chunks"

TASK_TRIGGER = f"""
CREATE TRIGGER sync_tasks_notify AFTER UPDATE ON sync_tasks FOR EACH ROW
WHEN ({TASK_CHANGED})
EXECUTE FUNCTION notify_task_event()
"""

FLUSH_TRIGGER = f"""
CREATE CONSTRAINT TRIGGER sync_tasks_notify_flush AFTER UPDATE ON sync_tasks
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
WHEN ({TASK_CHANGED})
EXECUTE FUNCTION flush_task_event()
"""

JOB_TRIGGER = """
CREATE TRIGGER sync_jobs_notify AFTER UPDATE ON sync_jobs FOR EACH ROW
WHEN (
    OLD.status IS DISTINCT FROM NEW.status
    OR OLD.planned_at IS DISTINCT FROM NEW.planned_at
    OR OLD.total_tasks IS DISTINCT FROM NEW.total_tasks
    OR OLD.completed_tasks IS DISTINCT FROM NEW.completed_tasks
    OR OLD.failed_tasks IS DISTINCT FROM NEW.failed_tasks
    OR OLD.cancelled_tasks IS DISTINCT FROM NEW.cancelled_tasks
    OR OLD.processed_records IS DISTINCT FROM NEW.processed_records
)
EXECUTE FUNCTION notify_job_event()
"""

# Revision 0002's definitions, restored on downgrade.
OLD_TASK_FUNCTION = f"""
CREATE OR REPLACE FUNCTION notify_task_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', json_build_object(
        'kind', 'task', 'xid', pg_current_xact_id()::text, 'job_id', NEW.job_id, 'task_id', NEW.id,
        'company_id', NEW.company_id, 'resource', NEW.resource, 'partition', NEW.partition_key,
        'status', NEW.status, 'attempts', NEW.attempts, 'chunks', NEW.chunks,
        'record_count', NEW.record_count, 'error', left(NEW.error_message, 500)
    )::text);
    RETURN NULL;
END
$$
"""

OLD_JOB_FUNCTION = f"""
CREATE OR REPLACE FUNCTION notify_job_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', json_build_object(
        'kind', 'job', 'xid', pg_current_xact_id()::text, 'job_id', NEW.id, 'status', NEW.status,
        'total_tasks', NEW.total_tasks, 'completed_tasks', NEW.completed_tasks,
        'failed_tasks', NEW.failed_tasks, 'cancelled_tasks', NEW.cancelled_tasks,
        'processed_records', NEW.processed_records, 'started_at', NEW.started_at,
        'completed_at', NEW.completed_at, 'error', left(NEW.error_message, 500)
    )::text);
    RETURN NULL;
END
$$
"""

OLD_TASK_TRIGGER = f"""
CREATE TRIGGER sync_tasks_notify AFTER UPDATE ON sync_tasks FOR EACH ROW
WHEN ({TASK_CHANGED})
EXECUTE FUNCTION notify_task_event()
"""

OLD_JOB_TRIGGER = """
CREATE TRIGGER sync_jobs_notify AFTER UPDATE ON sync_jobs FOR EACH ROW
WHEN (
    OLD.status IS DISTINCT FROM NEW.status
    OR OLD.total_tasks IS DISTINCT FROM NEW.total_tasks
    OR OLD.completed_tasks IS DISTINCT FROM NEW.completed_tasks
    OR OLD.failed_tasks IS DISTINCT FROM NEW.failed_tasks
    OR OLD.cancelled_tasks IS DISTINCT FROM NEW.cancelled_tasks
    OR OLD.processed_records IS DISTINCT FROM NEW.processed_records
)
EXECUTE FUNCTION notify_job_event()
"""


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    with op.batch_alter_table("sync_jobs") as batch:
        batch.add_column(sa.Column("planned_at", pipeline.models.UTCDateTime(), nullable=True))
    op.execute("UPDATE sync_jobs SET planned_at = created_at")
    if not _postgres():
        return
    op.execute("DROP TRIGGER IF EXISTS sync_jobs_notify ON sync_jobs")
    op.execute("DROP TRIGGER IF EXISTS sync_tasks_notify ON sync_tasks")
    op.execute(TASK_FUNCTION)
    op.execute(FLUSH_FUNCTION)
    op.execute(JOB_FUNCTION)
    op.execute(TASK_TRIGGER)
    op.execute(FLUSH_TRIGGER)
    op.execute(JOB_TRIGGER)


def downgrade() -> None:
    if _postgres():
        op.execute("DROP TRIGGER IF EXISTS sync_jobs_notify ON sync_jobs")
        op.execute("DROP TRIGGER IF EXISTS sync_tasks_notify_flush ON sync_tasks")
        op.execute("DROP TRIGGER IF EXISTS sync_tasks_notify ON sync_tasks")
        op.execute("DROP FUNCTION IF EXISTS flush_task_event()")
        op.execute(OLD_TASK_FUNCTION)
        op.execute(OLD_JOB_FUNCTION)
        op.execute(OLD_TASK_TRIGGER)
        op.execute(OLD_JOB_TRIGGER)
    with op.batch_alter_table("sync_jobs") as batch:
        batch.drop_column("planned_at")
