"""Error codes: ``sync_tasks.error_code`` next to ``error_message``, and in the task events.

Revision ID: 0005_error_codes
Revises: 0004
Create Date: 2026-12-01

The code (``pipeline.error_codes``) is what kind of failure a task had; the message stays the
readable text. On PostgreSQL the task event of revision 0004 (held, coalesced, sent at commit)
gains ``error_code``, so live event streams carry it too; nothing else about it changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_error_codes"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HELD_TASK = "pipeline.held_task_event"


def _task_function(with_code: bool) -> str:
    """Revision 0004's ``notify_task_event``, with or without the ``error_code`` field."""
    code = "\n        'error_code', NEW.error_code," if with_code else ""
    return f"""
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
        'record_count', NEW.record_count,{code}
        'error', left(NEW.error_message, 500)
    )::text, true);
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    with op.batch_alter_table("sync_tasks") as batch:
        batch.add_column(sa.Column("error_code", sa.String(40), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_task_function(with_code=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_task_function(with_code=False))
    with op.batch_alter_table("sync_tasks") as batch:
        batch.drop_column("error_code")
