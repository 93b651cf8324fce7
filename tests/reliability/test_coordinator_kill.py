"""A coordinator worker SIGKILLed mid-plan: the plan is retried into one job, no task planned twice.

The kill has to land while the coordinator holds the plan open: after it locked the job row,
wrote every task and marked the job planned, before it committed. Instead of hoping that a kill
sent "soon" lands in that window (which depends on how fast the machine plans), the test holds
the plan there: a trigger on the job's ``planned_at`` being set takes an advisory lock the test
holds, so the coordinator's last write waits inside its transaction until the test lets go. The
test sees it waiting in ``pg_stat_activity``, SIGKILLs the ``pipeline worker`` process group, and
only then releases the lock. The waiting time is the test's, not the machine's; and since the
pause is at the plan's last write, a plan that committed any part of itself earlier shows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Connection, func, select, text

from pipeline.control import submit_job
from pipeline.models import JOBS, TASKS
from tests.reliability.harness import SIZES, TINY, Harness, Size
from tests.services import wait_for

PAUSE_KEY = 0x434F_4F52_4B49_4C4C  # "COORKILL": the advisory lock the coordinator waits on mid-plan
PAUSE_SQL = f"""
CREATE FUNCTION test_pause_mid_plan() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({PAUSE_KEY});
    RETURN NULL;
END $$;
CREATE TRIGGER test_pause_mid_plan AFTER UPDATE OF planned_at ON sync_jobs FOR EACH ROW
    WHEN (OLD.planned_at IS NULL AND NEW.planned_at IS NOT NULL) EXECUTE FUNCTION test_pause_mid_plan();
"""
UNPAUSE_SQL = "DROP TRIGGER IF EXISTS test_pause_mid_plan ON sync_jobs; DROP FUNCTION IF EXISTS test_pause_mid_plan()"
# The coordinator's session, between marking the job planned (its last write) and its commit.
WAITING_MID_PLAN = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND wait_event_type = 'Lock' AND wait_event = 'advisory' AND query LIKE 'UPDATE sync_jobs%'")
# Any other session of this database inside a transaction that wrote or locked a row.
WRITING = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND backend_xid IS NOT NULL")


@contextmanager
def plans_held_mid_way(h: Harness) -> Iterator[Connection]:
    """Installs the pause; yields a connection holding it (``rollback()`` lets the plans go on)."""
    with h.engine.begin() as conn:
        conn.execute(text(PAUSE_SQL))
    try:
        with h.engine.connect() as holder:
            holder.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PAUSE_KEY})
            try:
                yield holder
            finally:
                holder.rollback()
    finally:
        with h.engine.begin() as conn:
            conn.execute(text(UNPAUSE_SQL))


def count(h: Harness, query: Any) -> int:
    with h.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def task_rows(h: Harness, job_id: uuid.UUID) -> tuple[int, int]:
    """(task rows, distinct (company, resource, partition)) of the job."""
    return count(h, select(func.count()).where(TASKS.c.job_id == job_id)), count(h, text(
        "SELECT count(*) FROM (SELECT DISTINCT company_id, resource, partition_key FROM sync_tasks "
        "WHERE job_id = :job) AS planned").bindparams(job=job_id))


def job_row(h: Harness, job_id: uuid.UUID) -> Any:
    with h.engine.connect() as conn:
        return conn.execute(select(JOBS).where(JOBS.c.id == job_id)).one()


@pytest.mark.parametrize("size", SIZES)
def test_a_coordinator_worker_killed_mid_plan_ends_with_one_job_and_no_task_planned_twice(
    make_harness: Any, size: Size
) -> None:
    h: Harness = make_harness(size)
    h.add_companies(size.companies, TINY)
    expected = size.tasks

    with plans_held_mid_way(h) as holder:
        submitted = submit_job(h.engine, h.actors, trigger="api", max_unfinished=5)
        [coordinator] = h.start_workers(1)
        wait_for(lambda: count(h, WAITING_MID_PLAN) == 1, timeout=60,
                 what="the coordinator to write its plan and wait before its commit", interval=0.05)
        assert count(h, select(func.count()).select_from(TASKS)) == 0, "no part of the plan is committed yet"
        assert job_row(h, submitted.job_id).planned_at is None, "no part of the plan is committed yet"
        assert count(h, text("SELECT pg_relation_size('sync_tasks')")) > 0, "its task rows are written"
        h.fleet.kill(coordinator)
        holder.rollback()  # the orphaned session goes on, finds its client gone, and rolls back
        wait_for(lambda: count(h, WRITING) == 0, timeout=60, what="the killed coordinator's transaction to end")

    assert job_row(h, submitted.job_id).planned_at is None, "the killed plan committed"
    assert task_rows(h, submitted.job_id) == (0, 0), "a killed plan leaves no task behind"

    h.start_workers()  # RabbitMQ re-delivers the coordinator message the killed worker never acked
    h.start_sweeper()
    wait_for(lambda: job_row(h, submitted.job_id).planned_at is not None, timeout=120,
             what="the re-delivered coordinator message to plan the job")
    [report] = h.finish(submitted.job_id)

    assert count(h, select(func.count()).select_from(JOBS)) == 1
    assert job_row(h, submitted.job_id).total_tasks == expected
    assert task_rows(h, submitted.job_id) == (expected, expected)
    assert report.states == {"completed": expected}
