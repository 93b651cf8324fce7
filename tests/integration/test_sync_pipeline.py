"""The core loop on real PostgreSQL, RabbitMQ and S3 (issue 2's acceptance)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import dramatiq
from sqlalchemy import select, update

from actors.tasks import Actors
from pipeline.companies import add_company
from pipeline.models import Company, Dataset, JobLog, SyncJob, SyncTask
from pipeline.planning import plan_job
from pipeline.progress import job_progress
from pipeline.runtime import Runtime
from tests.invariants import check_datasets, check_job_counters
from tests.services import S3Service, wait_for


def wait_job(rt: Runtime, job_id: uuid.UUID, timeout: float = 60) -> None:
    wait_for(lambda: job_progress(rt.engine, job_id).finished, timeout=timeout, what=f"job {job_id} to finish")


def add_synthetic(rt: Runtime, name: str, **config: Any) -> int:
    return add_company(rt.engine, name=name, connector="synthetic", config=config).id


def object_versions(s3: S3Service, bucket: str) -> dict[str, Any]:
    """Published objects and their upload times, once the workers have removed their staging parts
    (which happens just after the publishing commit)."""
    def listing() -> dict[str, Any]:
        return {o.object_name: o.last_modified for o in s3.client().list_objects(bucket, recursive=True)}

    wait_for(lambda: not any(key.startswith("_staging/") for key in listing()), timeout=10,
             what="staging parts to be removed")
    return listing()


def test_sync_of_three_companies_publishes_verified_datasets_and_resync_uploads_nothing(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, s3_service: S3Service, s3_bucket: str
) -> None:
    for index in range(3):
        add_synthetic(stack, f"company {index}", jobs_per_day=20 + index, seed=index, page_size=8)

    first = plan_job(stack.engine, actors, trigger="cli")
    assert first is not None and first.total_tasks == 3 * 8
    wait_job(stack, first.job_id)
    assert check_job_counters(stack.engine, first.job_id) == {"completed": 24}
    assert check_datasets(stack.engine, s3_service.client(), s3_bucket) == 24
    before = object_versions(s3_service, s3_bucket)
    assert len(before) == 24, "staging parts are removed after publishing"
    with stack.engine.connect() as conn:
        first_rows = {(r.company_id, r.resource, r.partition_key): r
                      for r in conn.execute(select(Dataset.__table__)).all()}

    second = plan_job(stack.engine, actors, trigger="cli")
    assert second is not None
    wait_job(stack, second.job_id)
    check_job_counters(stack.engine, second.job_id)
    assert object_versions(s3_service, s3_bucket) == before, "unchanged data must not be uploaded again"
    with stack.engine.connect() as conn:
        for row in conn.execute(select(Dataset.__table__)).all():
            old = first_rows[(row.company_id, row.resource, row.partition_key)]
            assert row.checksum_sha256 == old.checksum_sha256
            assert row.changed_at == old.changed_at
            assert row.synced_at > old.synced_at


def test_changed_data_publishes_a_new_version_and_keeps_the_old_one(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, s3_service: S3Service, s3_bucket: str
) -> None:
    company = add_synthetic(stack, "acme", jobs_per_day=5, days_ahead=1)
    job = plan_job(stack.engine, actors, trigger="cli", resources=["schedule"])
    assert job is not None
    wait_job(stack, job.job_id)
    with stack.engine.begin() as conn:
        conn.execute(update(Company).where(Company.id == company)
                     .values(connector_config={"jobs_per_day": 5, "days_ahead": 1, "version": 1}))
    job = plan_job(stack.engine, actors, trigger="cli", resources=["schedule"])
    assert job is not None
    wait_job(stack, job.job_id)
    check_datasets(stack.engine, s3_service.client(), s3_bucket)
    keys = [key for key in object_versions(s3_service, s3_bucket) if key.startswith(f"{company}/schedule/")]
    assert len(keys) == 2, "the previous version stays until garbage collection"


def test_same_message_delivered_twice_concurrently_gives_one_result(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, s3_service: S3Service, s3_bucket: str
) -> None:
    add_synthetic(stack, "dup", jobs_per_day=30, page_size=10, chunk_delay_s=0.3, days_ahead=1)
    job = plan_job(stack.engine, None, trigger="cli", resources=["schedule"])
    assert job is not None and job.total_tasks == 1
    task_id = job.task_ids[0]
    actors.enqueue([task_id, task_id, task_id], priority="high")
    wait_job(stack, job.job_id)
    with stack.engine.connect() as conn:
        task = conn.execute(select(SyncTask.__table__).where(SyncTask.id == task_id)).one()
        job_row = conn.execute(select(SyncJob.__table__).where(SyncJob.id == job.job_id)).one()
    assert task.status == "completed" and task.attempts == 1
    assert job_row.completed_tasks == 1 and job_row.processed_records == 30
    assert len([k for k in object_versions(s3_service, s3_bucket) if k.endswith(".json")]) == 1
    check_job_counters(stack.engine, job.job_id)
    check_datasets(stack.engine, s3_service.client(), s3_bucket)


def test_connector_failing_twice_then_succeeding_completes_on_the_third_attempt(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker
) -> None:
    add_synthetic(stack, "flaky", jobs_per_day=3, days_ahead=1, fail_attempts=2)
    job = plan_job(stack.engine, actors, trigger="cli")
    assert job is not None
    wait_job(stack, job.job_id)
    assert check_job_counters(stack.engine, job.job_id) == {"completed": 2}
    with stack.engine.connect() as conn:
        attempts = set(conn.execute(select(SyncTask.attempts).where(SyncTask.job_id == job.job_id)).scalars())
        logged = conn.execute(select(JobLog.message).where(JobLog.job_id == job.job_id)).scalars().all()
    assert attempts == {3}
    assert sum("injected failure" in message for message in logged) == 4


def test_connector_always_failing_fails_its_task_and_job_but_not_the_other_tasks(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, s3_service: S3Service, s3_bucket: str
) -> None:
    add_synthetic(stack, "broken", jobs_per_day=3, days_ahead=2, fail_attempts=50, fail_partitions=["all"])
    add_synthetic(stack, "fine", jobs_per_day=3, days_ahead=2)
    job = plan_job(stack.engine, actors, trigger="cli")
    assert job is not None
    wait_job(stack, job.job_id)
    assert check_job_counters(stack.engine, job.job_id) == {"completed": 5, "failed": 1}
    with stack.engine.connect() as conn:
        failed = conn.execute(select(SyncTask.__table__).where(SyncTask.status == "failed")).one()
        job_row = conn.execute(select(SyncJob.__table__).where(SyncJob.id == job.job_id)).one()
    assert failed.attempts == stack.settings.max_attempts
    assert "synthetic upstream unavailable" in (failed.error_message or "")
    assert job_row.status == "failed" and "1 of 6 tasks failed" in (job_row.error_message or "")
    assert check_datasets(stack.engine, s3_service.client(), s3_bucket) == 5


def test_non_retryable_upstream_error_fails_at_once(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker
) -> None:
    add_synthetic(stack, "poison", jobs_per_day=3, days_ahead=1, poison_partitions=["all"])
    job = plan_job(stack.engine, actors, trigger="cli")
    assert job is not None
    wait_job(stack, job.job_id)
    with stack.engine.connect() as conn:
        failed = conn.execute(select(SyncTask.__table__).where(SyncTask.status == "failed")).one()
    assert failed.attempts == 1
    assert "has no primary key 'EmployeeInformationId'" in (failed.error_message or "")


def test_concurrent_finishers_count_every_task_exactly_once(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker
) -> None:
    companies = [add_synthetic(stack, f"c{index}", jobs_per_day=2, days_ahead=7, employees=3) for index in range(8)]
    jobs = []
    # Two jobs at once over different companies (a partition with an open task gets no second one).
    threads = [threading.Thread(target=lambda half=half: jobs.append(
        plan_job(stack.engine, actors, trigger="api", company_ids=companies[half::2]))) for half in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job in jobs:
        assert job is not None
        wait_job(stack, job.job_id)
        assert check_job_counters(stack.engine, job.job_id) == {"completed": 32}
