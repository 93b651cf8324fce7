"""The coordinator actor: a submitted job is planned by ``coordinate_sync`` on a worker, once.

Submitting (``POST /sync``, a scheduler tick, ``pipeline sync``) only inserts the job row and
sends one message; these tests prove the plan happens exactly once whatever goes wrong with the
coordinator: its message lost or duplicated, its scope gone stale. A coordinator worker SIGKILLed
mid-plan is tests/reliability/test_coordinator_kill.py (it holds the plan open at a fixed point).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
from sqlalchemy import event, func, insert, select, text, update

from actors.tasks import Actors
from pipeline.control import submit_job
from pipeline.models import COMPANIES, JOBS, TASKS, Company, utcnow
from pipeline.planning import coordinate_job, create_job
from pipeline.progress import job_progress
from pipeline.runtime import Runtime
from pipeline.sweeper import sweep
from tests.integration.control_helpers import add_synthetic
from tests.invariants import check_job_counters
from tests.services import wait_for


def add_companies(rt: Runtime, count: int, config: dict[str, Any], *, start: int = 0) -> None:
    now = utcnow()
    with rt.engine.begin() as conn:
        conn.execute(insert(COMPANIES), [
            {"name": f"Company {index}", "external_id": f"ext-{index}", "sync_enabled": True,
             "connector": "synthetic", "connector_config": config, "feature_toggles": {},
             "created_at": now, "updated_at": now}
            for index in range(start, start + count)
        ])


def job_row(rt: Runtime, job_id: uuid.UUID) -> Any:
    with rt.engine.connect() as conn:
        return conn.execute(select(JOBS).where(JOBS.c.id == job_id)).one()


def task_counts(rt: Runtime, job_id: uuid.UUID) -> tuple[int, int]:
    """(task rows, distinct (company, resource, partition)) of the job."""
    with rt.engine.connect() as conn:
        rows = conn.execute(select(func.count()).where(TASKS.c.job_id == job_id)).scalar_one()
        distinct = conn.execute(text(
            "SELECT count(*) FROM (SELECT DISTINCT company_id, resource, partition_key FROM sync_tasks "
            "WHERE job_id = :job) AS planned"), {"job": job_id}).scalar_one()
    return rows, distinct


def test_the_sweeper_resends_a_lost_coordinator_message_and_the_job_runs(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker
) -> None:
    add_synthetic(stack, "a", days_ahead=2, jobs_per_day=4)
    with stack.engine.begin() as conn:
        submitted = create_job(conn, trigger="cli")  # recorded, but its message never sent
    assert submitted is not None
    assert job_progress(stack.engine, submitted.job_id).status == "planning"
    assert sweep(stack.engine, actors, pending_grace_s=60).unplanned_jobs == 0, "not stale yet"
    report = sweep(stack.engine, actors, pending_grace_s=60, now=datetime.now(UTC) + timedelta(seconds=61))
    assert report.unplanned_jobs == 1
    wait_for(lambda: job_progress(stack.engine, submitted.job_id).finished, timeout=60, what="the swept job")
    assert check_job_counters(stack.engine, submitted.job_id) == {"completed": 3}


def test_a_job_the_coordinator_never_planned_fails_after_the_plan_deadline(stack: Runtime, actors: Actors) -> None:
    add_synthetic(stack, "a", days_ahead=1)
    with stack.engine.begin() as conn:
        submitted = create_job(conn, trigger="cli")
    assert submitted is not None
    report = sweep(stack.engine, actors, pending_grace_s=60, plan_deadline_s=3600,
                   now=datetime.now(UTC) + timedelta(seconds=3601))
    assert report.expired_plans == 1
    failed = job_progress(stack.engine, submitted.job_id)
    assert failed.status == "failed" and failed.error is not None and "did not plan the job in time" in failed.error
    assert coordinate_job(stack.engine, actors, submitted.job_id) is None, "a failed job is never planned late"
    assert task_counts(stack, submitted.job_id) == (0, 0)


def test_a_duplicate_coordinator_message_plans_and_sends_nothing_more(stack: Runtime) -> None:
    add_synthetic(stack, "a", days_ahead=3)
    with stack.engine.begin() as conn:
        submitted = create_job(conn, trigger="cli")
    assert submitted is not None
    planned = coordinate_job(stack.engine, None, submitted.job_id)
    assert planned is not None and planned.total_tasks == 4
    assert job_progress(stack.engine, submitted.job_id).status == "pending"
    assert coordinate_job(stack.engine, None, submitted.job_id) is None
    assert task_counts(stack, submitted.job_id) == (4, 4)


def test_a_scope_that_no_longer_plans_fails_the_job_naming_the_company(stack: Runtime) -> None:
    company = add_synthetic(stack, "a", days_ahead=1)
    with stack.engine.begin() as conn:
        submitted = create_job(conn, trigger="api", company_ids=[company])
        assert submitted is not None
        conn.execute(update(Company).where(Company.id == company).values(sync_enabled=False))
    assert coordinate_job(stack.engine, None, submitted.job_id) is None
    failed = job_progress(stack.engine, submitted.job_id)
    assert failed.status == "failed" and failed.error is not None
    assert "disabled" in failed.error and str(company) in failed.error


def test_submitting_a_job_does_the_same_work_for_10000_companies_as_for_one(stack: Runtime, actors: Actors) -> None:
    # Load-independent: the statements submit_job sends (and the rows they touch) do not grow with
    # the companies in scope, and no task exists when it returns; bench/submit.py times the HTTP answer.
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    def submitted_statements() -> list[str]:
        statements.clear()
        event.listen(stack.engine, "before_cursor_execute", count)
        try:
            submitted = submit_job(stack.engine, actors, trigger="api", max_unfinished=10)
        finally:
            event.remove(stack.engine, "before_cursor_execute", count)
        assert task_counts(stack, submitted.job_id) == (0, 0)
        return list(statements)

    add_companies(stack, 1, {"days_ahead": 7, "jobs_per_day": 1})
    for_one = submitted_statements()
    add_companies(stack, 9_999, {"days_ahead": 7, "jobs_per_day": 1}, start=1)
    for_many = submitted_statements()
    assert for_many == for_one and len(for_one) <= 4, (for_one, for_many)
