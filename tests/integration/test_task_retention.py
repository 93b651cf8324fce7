"""Retention of completed task rows (``PIPELINE_TASK_RETENTION_DAYS``): shorter than their jobs'."""

from __future__ import annotations

import uuid
from datetime import timedelta

import dramatiq
import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, update

from actors.tasks import Actors
from pipeline.cleanup import cleanup, delete_old_task_rows
from pipeline.models import JOB_LOG, JOBS, TASKS, utcnow
from pipeline.planning import plan_job
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from tests.integration.control_helpers import add_synthetic, wait_job
from tests.invariants import check_job_counters


def test_completed_task_rows_of_old_finished_jobs_are_deleted_in_batches_and_the_jobs_keep_their_counters(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker
) -> None:
    company = add_synthetic(stack, "retained", days_ahead=5, jobs_per_day=3)
    old = plan_job(stack.engine, actors, trigger="cli", company_ids=[company], resources=["schedule"])
    assert old is not None
    wait_job(stack, old.job_id)
    recent = plan_job(stack.engine, actors, trigger="cli", company_ids=[company], resources=["schedule"])
    assert recent is not None
    wait_job(stack, recent.job_id)
    with stack.engine.begin() as conn:
        # The old job finished three days ago; one of its tasks is made a failed one, kept for its error.
        conn.execute(update(JOBS).where(JOBS.c.id == old.job_id).values(completed_at=utcnow() - timedelta(days=3)))
        failed = conn.execute(select(TASKS.c.id).where(TASKS.c.job_id == old.job_id).limit(1)).scalar_one()
        conn.execute(update(TASKS).where(TASKS.c.id == failed).values(status="failed", error_message="kept"))
        counters_before = conn.execute(
            select(JOBS.c.total_tasks, JOBS.c.completed_tasks, JOBS.c.processed_records)
            .where(JOBS.c.id == old.job_id)).one()

    # Batches of 2 over the old job's 5 completed rows: three transactions, every row gone.
    assert delete_old_task_rows(stack.engine, retention_days=1, batch=2) == old.total_tasks - 1

    with stack.engine.connect() as conn:
        counts = conn.execute(select(TASKS.c.job_id, func.count()).group_by(TASKS.c.job_id)).all()
        left: dict[uuid.UUID, int] = {row[0]: row[1] for row in counts}
        assert left == {old.job_id: 1, recent.job_id: recent.total_tasks}
        assert conn.execute(select(TASKS.c.status).where(TASKS.c.job_id == old.job_id)).scalar_one() == "failed"
        job = conn.execute(select(JOBS.c.status, JOBS.c.total_tasks, JOBS.c.completed_tasks,
                                  JOBS.c.processed_records).where(JOBS.c.id == old.job_id)).one()
        assert job.status == "completed" and tuple(job[1:]) == tuple(counters_before)
        assert conn.execute(select(func.count()).select_from(JOB_LOG)
                            .where(JOB_LOG.c.task_id.is_not(None), ~JOB_LOG.c.task_id.in_(
                                select(TASKS.c.id)))).scalar_one() == 0
    check_job_counters(stack.engine, recent.job_id)

    # Through cleanup: nothing older is left, the job rows stay (their 7-day retention is not up).
    report = cleanup(stack.engine, stack.store, retention_days=7, grace_s=3600, task_retention_days=1)
    assert (report.tasks_deleted, report.jobs_deleted) == (0, 0)
    # Unset, completed rows stay as long as their jobs.
    assert cleanup(stack.engine, stack.store, retention_days=7, grace_s=3600).tasks_deleted == 0
    with stack.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(JOBS)).scalar_one() == 2


def test_a_negative_task_retention_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValidationError, match="task_retention_days"):
        Settings(task_retention_days=-1)
