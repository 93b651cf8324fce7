"""Error codes: ``sync_tasks.error_code`` next to ``error_message``, and in the task events.

Revision ID: 0005_error_codes
Revises: 0002
Create Date: 2026-12-01

The code (``pipeline.error_codes``) is what kind of failure a task had; the message stays the
readable text. On PostgreSQL the task notification payload (migration 0002) gains
``error_code`` so live event streams carry it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_error_codes"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _task_function(with_code: bool) -> str:
    code = "\n        'error_code', NEW.error_code," if with_code else ""
    return f"""
CREATE OR REPLACE FUNCTION notify_task_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('job_events', json_build_object(
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
    )::text);
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
