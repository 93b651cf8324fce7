"""Coalesced job events, and ``sync_jobs.planned_at`` for jobs the coordinator has not planned yet.

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-01

``planned_at`` is NULL while a job waits for the ``coordinate_sync`` actor to insert its tasks
(its status shows as ``planning``); jobs planned before this revision are marked planned.

Events (PostgreSQL only; SQLite polls). Every NOTIFY-issuing commit takes PostgreSQL's global
notify lock, so a transaction sends what listeners need, coalesced:

- a task transition (``status`` or ``chunks`` changed) and a job change (status, planned,
  counters) are held in transaction-local settings instead of being sent at once; later
  changes of the same task, or of the same job, replace them (the last state wins);
- a job change takes the held task event of the same job into its ``task`` key: the publish
  (task completed + job counters + job completed) is ONE notification, and so is the claim
  that starts a job;
- what is held is sent at commit, by deferred constraint triggers — or earlier, when another
  task's or job's event is about to be held (a cancel of many tasks: one event per task, the
  last one inside the job's).

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
HELD_TASK = "pipeline.held_task_event"
HELD_JOB = "pipeline.held_job_event"

FLUSH_FUNCTION = f"""
CREATE OR REPLACE FUNCTION job_events_flush() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    held_job text := coalesce(current_setting('{HELD_JOB}', true), '');
    held_task text := coalesce(current_setting('{HELD_TASK}', true), '');
    job jsonb;
BEGIN
    IF held_job <> '' THEN
        job := held_job::jsonb;
        IF held_task <> '' AND NOT job ? 'task' AND held_task::jsonb ->> 'job_id' = job ->> 'job_id' THEN
            job := job || jsonb_build_object('task', held_task::jsonb);
            held_task := '';
        END IF;
        PERFORM pg_notify('{CHANNEL}', job::text);
        PERFORM set_config('{HELD_JOB}', '', true);
    END IF;
    IF held_task <> '' THEN
        PERFORM pg_notify('{CHANNEL}', held_task);
    END IF;
    PERFORM set_config('{HELD_TASK}', '', true);
END
$$
"""

AT_COMMIT_FUNCTION = """
CREATE OR REPLACE FUNCTION job_events_at_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM job_events_flush();
    RETURN NULL;
END
$$
"""

TASK_FUNCTION = f"""
CREATE OR REPLACE FUNCTION notify_task_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    held_task text := coalesce(current_setting('{HELD_TASK}', true), '');
BEGIN
    IF held_task <> '' AND (held_task::jsonb ->> 'task_id')::bigint <> NEW.id THEN
        PERFORM job_events_flush();
    END IF;
    PERFORM set_config('{HELD_TASK}', json_build_object(
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

JOB_FUNCTION = f"""
CREATE OR REPLACE FUNCTION notify_job_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    held_job text := coalesce(current_setting('{HELD_JOB}', true), '');
    held_task text := coalesce(current_setting('{HELD_TASK}', true), '');
    previous jsonb;
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
    IF held_job <> '' THEN
        previous := held_job::jsonb;
        IF previous ->> 'job_id' <> NEW.id::text THEN
            PERFORM job_events_flush();  -- another job's change goes first
            held_task := '';
        ELSIF previous ? 'task' THEN
            IF held_task <> '' THEN
                PERFORM pg_notify('{CHANNEL}', held_job);  -- its task event must not be lost
            ELSE
                payload := payload || jsonb_build_object('task', previous -> 'task');
            END IF;
        END IF;
    END IF;
    IF held_task <> '' THEN
        IF held_task::jsonb ->> 'job_id' = NEW.id::text THEN
            payload := payload || jsonb_build_object('task', held_task::jsonb);
        ELSE
            PERFORM pg_notify('{CHANNEL}', held_task);
        END IF;
        PERFORM set_config('{HELD_TASK}', '', true);
    END IF;
    PERFORM set_config('{HELD_JOB}', payload::text, true);
    RETURN NULL;
END
$$
"""

TASK_CHANGED = "OLD.status IS DISTINCT FROM NEW.status OR OLD.chunks IS DISTINCT FROM NEW.chunks"
JOB_CHANGED = """
    OLD.status IS DISTINCT FROM NEW.status
    OR OLD.planned_at IS DISTINCT FROM NEW.planned_at
    OR OLD.total_tasks IS DISTINCT FROM NEW.total_tasks
    OR OLD.completed_tasks IS DISTINCT FROM NEW.completed_tasks
    OR OLD.failed_tasks IS DISTINCT FROM NEW.failed_tasks
    OR OLD.cancelled_tasks IS DISTINCT FROM NEW.cancelled_tasks
    OR OLD.processed_records IS DISTINCT FROM NEW.processed_records
"""

TRIGGERS = [
    f"CREATE TRIGGER sync_tasks_notify AFTER UPDATE ON sync_tasks FOR EACH ROW WHEN ({TASK_CHANGED}) "
    "EXECUTE FUNCTION notify_task_event()",
    f"CREATE TRIGGER sync_jobs_notify AFTER UPDATE ON sync_jobs FOR EACH ROW WHEN ({JOB_CHANGED}) "
    "EXECUTE FUNCTION notify_job_event()",
    "CREATE CONSTRAINT TRIGGER sync_tasks_notify_at_commit AFTER UPDATE ON sync_tasks "
    f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN ({TASK_CHANGED}) EXECUTE FUNCTION job_events_at_commit()",
    "CREATE CONSTRAINT TRIGGER sync_jobs_notify_at_commit AFTER UPDATE ON sync_jobs "
    f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN ({JOB_CHANGED}) EXECUTE FUNCTION job_events_at_commit()",
]

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
    for function in (FLUSH_FUNCTION, AT_COMMIT_FUNCTION, TASK_FUNCTION, JOB_FUNCTION):
        op.execute(function)
    for trigger in TRIGGERS:
        op.execute(trigger)


def downgrade() -> None:
    if _postgres():
        op.execute("DROP TRIGGER IF EXISTS sync_jobs_notify_at_commit ON sync_jobs")
        op.execute("DROP TRIGGER IF EXISTS sync_tasks_notify_at_commit ON sync_tasks")
        op.execute("DROP TRIGGER IF EXISTS sync_jobs_notify ON sync_jobs")
        op.execute("DROP TRIGGER IF EXISTS sync_tasks_notify ON sync_tasks")
        op.execute("DROP FUNCTION IF EXISTS job_events_at_commit()")
        op.execute("DROP FUNCTION IF EXISTS job_events_flush()")
        op.execute(OLD_TASK_FUNCTION)
        op.execute(OLD_JOB_FUNCTION)
        op.execute(OLD_TASK_TRIGGER)
        op.execute(OLD_JOB_TRIGGER)
    with op.batch_alter_table("sync_jobs") as batch:
        batch.drop_column("planned_at")
