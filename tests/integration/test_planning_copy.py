"""Tasks go into PostgreSQL with COPY: names with COPY's special characters arrive intact."""

from __future__ import annotations

import uuid

from sqlalchemy import insert, select

from pipeline.companies import add_company
from pipeline.models import JOBS, TASKS, utcnow
from pipeline.planning import _insert_tasks
from pipeline.runtime import Runtime


def test_insert_tasks_copies_tabs_newlines_backslashes_and_unicode_verbatim(stack: Runtime) -> None:
    company = add_company(stack.engine, name="Odd Names", connector="synthetic", config={})
    partitions = ["tab\there", "new\nline", "carriage\rreturn", "back\\slash", r"\N", "ünïcødé ✓", ""]
    job_id, now = uuid.uuid4(), utcnow()
    with stack.engine.begin() as conn:
        conn.execute(insert(JOBS).values(id=job_id, trigger="cli", mode="full", priority="high", status="pending",
                                         scope={}, total_tasks=len(partitions), created_at=now))
        _insert_tasks(conn, job_id, [(company.id, "schedule", partition) for partition in partitions], now)
    with stack.engine.connect() as conn:
        stored = conn.execute(select(TASKS.c.partition_key, TASKS.c.status, TASKS.c.attempts)
                              .where(TASKS.c.job_id == job_id)).all()
    assert sorted(row.partition_key for row in stored) == sorted(partitions)
    assert {(row.status, row.attempts) for row in stored} == {("pending", 0)}
