"""Job events: triggers on sync_tasks and sync_jobs that ``pg_notify('job_events', json)``.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-24

PostgreSQL only (a no-op on SQLite, whose embedded mode polls). The feed behind
``GET /sync/jobs/{id}/events`` and ``pipeline sync --wait`` (``pipeline.events``):

- a task's row notifies when its ``status`` or ``chunks`` change (a transition or a chunk step);
- a job's row notifies when its ``status`` or a counter changes (progress).

Inserts do not notify: planning 80,000 tasks would queue 80,000 notifications nobody needs (a
subscriber starts from a snapshot). Every payload carries ``xid``, the writing transaction's id,
so a subscriber can skip the notifications its snapshot already reflects. Free text is cut
short, which keeps each payload far below NOTIFY's 8,000-byte limit.
``pg_current_xact_id()`` needs PostgreSQL 13 or newer.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "job_events"

TASK_FUNCTION = f"""
CREATE OR REPLACE FUNCTION notify_task_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', json_build_object(
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
    )::text);
    RETURN NULL;
END
$$
"""

JOB_FUNCTION = f"""
CREATE OR REPLACE FUNCTION notify_job_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', json_build_object(
        'kind', 'job',
        'xid', pg_current_xact_id()::text,
        'job_id', NEW.id,
        'status', NEW.status,
        'total_tasks', NEW.total_tasks,
        'completed_tasks', NEW.completed_tasks,
        'failed_tasks', NEW.failed_tasks,
        'cancelled_tasks', NEW.cancelled_tasks,
        'processed_records', NEW.processed_records,
        'started_at', NEW.started_at,
        'completed_at', NEW.completed_at,
        'error', left(NEW.error_message, 500)
    )::text);
    RETURN NULL;
END
$$
"""

TASK_TRIGGER = """
CREATE TRIGGER sync_tasks_notify AFTER UPDATE ON sync_tasks FOR EACH ROW
WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.chunks IS DISTINCT FROM NEW.chunks)
EXECUTE FUNCTION notify_task_event()
"""

JOB_TRIGGER = """
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
    if not _postgres():
        return
    op.execute(TASK_FUNCTION)
    op.execute(JOB_FUNCTION)
    op.execute(TASK_TRIGGER)
    op.execute(JOB_TRIGGER)


def downgrade() -> None:
    if not _postgres():
        return
    op.execute("DROP TRIGGER IF EXISTS sync_jobs_notify ON sync_jobs")
    op.execute("DROP TRIGGER IF EXISTS sync_tasks_notify ON sync_tasks")
    op.execute("DROP FUNCTION IF EXISTS notify_job_event()")
    op.execute("DROP FUNCTION IF EXISTS notify_task_event()")
