"""Issue 11, defect 7: at most one open task per partition, whatever triggered the jobs.

A person's sync (``POST /sync``, ``pipeline sync``: trigger ``api`` / ``cli``, planned by the
coordinator) and the scheduler's ticks all skip a partition that already has a pending or
processing task in another job, and say so in the new job's log; a job whose every partition
was skipped ends at once. Two planners at the same moment are serialised, so neither misses the
other's task. On real PostgreSQL; the upstream is scripted (tests/fakes/scripted.py).
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select, text

from pipeline.control import InvalidJobState, retry_job
from pipeline.execution import Outcome, run_task
from pipeline.jobs import claim_task, record_attempt_failure
from pipeline.models import JOB_LOG, JOBS, TASKS
from pipeline.planning import PLAN_LOCK, PlannedJob, coordinate_job, create_job, plan_job
from pipeline.runtime import Runtime
from tests.fakes import scripted
from tests.fakes.scripted import Script, fixed, install
from tests.invariants import check_job_counters
from tests.services import wait_for

pytestmark = pytest.mark.usefixtures("scripted_connector")


def add_company(rt: Runtime, name: str = "c", partitions: list[str] | None = None) -> int:
    from pipeline.companies import add_company as add

    script = Script(pages=fixed([[{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]]), partitions=partitions or ["all"])
    return add(rt.engine, name=name, connector=scripted.NAME, config=install(script)).id


def job(rt: Runtime, job_id: uuid.UUID) -> Any:
    with rt.engine.connect() as conn:
        return conn.execute(select(JOBS).where(JOBS.c.id == job_id)).one()


def skip_entries(rt: Runtime, job_id: uuid.UUID) -> list[Any]:
    with rt.engine.connect() as conn:
        rows = conn.execute(select(JOB_LOG).where(JOB_LOG.c.job_id == job_id).order_by(JOB_LOG.c.id)).all()
    return [row for row in rows if (row.data or {}).get("event") == "skipped_open_partitions"]


def open_tasks_per_partition(rt: Runtime) -> Counter[tuple[int, str, str]]:
    with rt.engine.connect() as conn:
        rows = conn.execute(select(TASKS.c.company_id, TASKS.c.resource, TASKS.c.partition_key)
                            .where(TASKS.c.status.in_(("pending", "processing")))).all()
    return Counter((row.company_id, row.resource, row.partition_key) for row in rows)


def people_sync(rt: Runtime, company: int, trigger: str = "api") -> PlannedJob | None:
    """What ``POST /sync`` (``api``) and ``pipeline sync`` (``cli``) do: submit, then the coordinator plans."""
    with rt.engine.begin() as conn:
        submitted = create_job(conn, trigger=trigger, company_ids=[company])
    assert submitted is not None
    return coordinate_job(rt.engine, None, submitted.job_id)


def test_a_persons_sync_skips_a_partition_a_scheduled_task_still_has_open_and_ends_at_once(stack: Runtime) -> None:
    company = add_company(stack)
    tick = plan_job(stack.engine, None, trigger="schedule", tick_key=f"t{uuid.uuid4().hex}")
    assert tick is not None and tick.total_tasks == 1
    for trigger in ("api", "cli"):
        planned = people_sync(stack, company, trigger)
        assert planned is not None and planned.task_ids == [] and planned.skipped_open == 1
        row = job(stack, planned.job_id)
        assert row.status == "completed" and row.total_tasks == 0 and row.completed_at is not None, (
            "a job whose every partition was skipped must end, not wait")
        check_job_counters(stack.engine, planned.job_id)
        (entry,) = skip_entries(stack, planned.job_id)
        assert entry.level == "warning"
        assert entry.message.startswith("skipped 1 partition(s) that already have an open task in another job "
                                        "(every partition in scope: nothing left to do, the job ends now)")
        assert entry.data["count"] == 1 and entry.data["partitions"] == [f"{company}/{scripted.RESOURCE}/all"]
    assert open_tasks_per_partition(stack) == {(company, scripted.RESOURCE, "all"): 1}
    # Once the open task ends, the next sync plans the partition again.
    assert run_task(stack, tick.task_ids[0]) is Outcome.COMPLETED
    again = people_sync(stack, company)
    assert again is not None and again.total_tasks == 1 and again.skipped_open == 0
    assert skip_entries(stack, again.job_id) == []


def test_a_tick_skips_a_partition_a_persons_sync_has_open_and_plans_the_others(stack: Runtime) -> None:
    company = add_company(stack, partitions=["a", "b", "c"])
    first = plan_job(stack.engine, None, trigger="api", company_ids=[company], partitions=["b"])
    assert first is not None and first.total_tasks == 1
    tick = plan_job(stack.engine, None, trigger="schedule", tick_key=f"t{uuid.uuid4().hex}")
    assert tick is not None and tick.total_tasks == 2 and tick.skipped_open == 1
    with stack.engine.connect() as conn:
        planned = sorted(conn.execute(select(TASKS.c.partition_key).where(TASKS.c.job_id == tick.job_id)).scalars())
    assert planned == ["a", "c"]
    (entry,) = skip_entries(stack, tick.job_id)
    assert "nothing left to do" not in entry.message and f"{company}/{scripted.RESOURCE}/b" in entry.message
    assert job(stack, tick.job_id).status == "pending"
    assert set(open_tasks_per_partition(stack).values()) == {1}


def at_once_on_the_plan_lock(rt: Runtime, calls: list[Callable[[], object]]) -> list[BaseException]:
    """Run ``calls`` in threads while this test holds ``PLAN_LOCK``, release it once every one
    waits on it (so they are all inside their transaction at once); the errors they raised."""
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    with rt.engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(hashtextextended(:key, 0))"), {"key": PLAN_LOCK})
        threads = [threading.Thread(target=run, args=(call,)) for call in calls]
        for thread in threads:
            thread.start()

        def waiting() -> int:
            return int(holder.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND objid = (hashtextextended(:key, 0) & x'ffffffff'::bigint)::oid"), {"key": PLAN_LOCK}).scalar_one())

        wait_for(lambda: waiting() == len(calls), timeout=30, what="every caller to wait on the planning lock")
        holder.execute(text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), {"key": PLAN_LOCK})
        holder.commit()
        for thread in threads:
            thread.join(60)
    return errors


def test_two_plans_at_the_same_moment_give_a_partition_one_open_task(stack: Runtime) -> None:
    company = add_company(stack, partitions=["a", "b"])
    results: list[PlannedJob | None] = []
    errors = at_once_on_the_plan_lock(stack, [lambda: results.append(people_sync(stack, company))] * 2)
    assert errors == []
    assert sorted(planned.total_tasks for planned in results if planned is not None) == [0, 2]
    assert open_tasks_per_partition(stack) == {(company, scripted.RESOURCE, "a"): 1,
                                               (company, scripted.RESOURCE, "b"): 1}


def fail(rt: Runtime, task_id: int) -> None:
    claim = claim_task(rt.engine, task_id, lease_s=60)
    assert claim is not None
    record_attempt_failure(rt.engine, claim, "injected", final=True)


def task_status(rt: Runtime, task_id: int) -> str:
    with rt.engine.connect() as conn:
        return str(conn.execute(select(TASKS.c.status).where(TASKS.c.id == task_id)).scalar_one())


def retry_entries(rt: Runtime, job_id: uuid.UUID) -> list[Any]:
    with rt.engine.connect() as conn:
        rows = conn.execute(select(JOB_LOG).where(JOB_LOG.c.job_id == job_id).order_by(JOB_LOG.c.id)).all()
    return [row for row in rows if (row.data or {}).get("event") == "retry_skipped_open_partitions"]


def test_retry_leaves_a_task_whose_partition_a_newer_job_has_open_and_retries_the_others(stack: Runtime) -> None:
    company = add_company(stack, partitions=["a", "b"])
    first = plan_job(stack.engine, None, trigger="api", company_ids=[company])
    assert first is not None and first.total_tasks == 2
    task_a, task_b = first.task_ids
    fail(stack, task_a)
    fail(stack, task_b)
    assert job(stack, first.job_id).status == "failed"
    newer = plan_job(stack.engine, None, trigger="api", company_ids=[company], partitions=["b"])
    assert newer is not None and newer.total_tasks == 1

    result = retry_job(stack.engine, None, job_id=first.job_id, requested_by="test")
    assert result.retried_tasks == 1
    assert task_status(stack, task_a) == "pending"
    assert task_status(stack, task_b) == "failed", "b has an open task in the newer job: left as it is"
    assert open_tasks_per_partition(stack) == {(company, scripted.RESOURCE, "a"): 1,
                                               (company, scripted.RESOURCE, "b"): 1}
    row = job(stack, first.job_id)
    assert row.status == "processing" and row.failed_tasks == 1
    (entry,) = retry_entries(stack, first.job_id)
    assert entry.level == "warning" and entry.data["count"] == 1
    assert entry.message.startswith("retry left 1 task(s) as they are: their partition has an open task in another job")
    assert entry.message.endswith(f"{company}/{scripted.RESOURCE}/b")
    # The retried task finishes and the job ends failed: b is still failed in it.
    assert run_task(stack, task_a) is Outcome.COMPLETED
    assert job(stack, first.job_id).status == "failed"
    check_job_counters(stack.engine, first.job_id)


def test_retry_with_every_partition_open_elsewhere_is_refused_naming_why_and_changes_nothing(
    stack: Runtime,
) -> None:
    company = add_company(stack)
    first = plan_job(stack.engine, None, trigger="api", company_ids=[company])
    assert first is not None
    (task,) = first.task_ids
    fail(stack, task)
    newer = plan_job(stack.engine, None, trigger="api", company_ids=[company])
    assert newer is not None and newer.total_tasks == 1

    expected = (f"job {first.job_id} has no failed or cancelled task to retry: the partition of every one (1) "
                f"has an open task in another job: {company}/{scripted.RESOURCE}/all")
    with pytest.raises(InvalidJobState) as refused:
        retry_job(stack.engine, None, job_id=first.job_id, requested_by="test")
    assert str(refused.value) == expected
    assert task_status(stack, task) == "failed" and job(stack, first.job_id).status == "failed"
    assert open_tasks_per_partition(stack) == {(company, scripted.RESOURCE, "all"): 1}
    # Once the newer job's task ends, the retry goes ahead.
    assert run_task(stack, newer.task_ids[0]) is Outcome.COMPLETED
    assert retry_job(stack.engine, None, job_id=first.job_id, requested_by="test").retried_tasks == 1
    assert task_status(stack, task) == "pending"


def test_a_retry_and_a_plan_at_the_same_moment_give_a_partition_one_open_task(stack: Runtime) -> None:
    company = add_company(stack)
    first = plan_job(stack.engine, None, trigger="api", company_ids=[company])
    assert first is not None
    fail(stack, first.task_ids[0])
    errors = at_once_on_the_plan_lock(stack, [
        lambda: retry_job(stack.engine, None, job_id=first.job_id, requested_by="test"),
        lambda: people_sync(stack, company),
    ])
    # Whichever went first has the partition's one open task; a retry that came second is refused.
    assert all(isinstance(error, InvalidJobState) and "has an open task in another job" in str(error)
               for error in errors), errors
    assert open_tasks_per_partition(stack) == {(company, scripted.RESOURCE, "all"): 1}
