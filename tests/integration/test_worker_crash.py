"""A worker process killed with SIGKILL mid-task: the sweeper re-sends the task and it completes."""

from __future__ import annotations

from sqlalchemy import select

from actors.tasks import Actors
from pipeline.companies import add_company
from pipeline.models import SyncTask
from pipeline.planning import plan_job
from pipeline.progress import job_progress
from pipeline.runtime import Runtime
from pipeline.sweeper import sweep
from tests.integration.conftest import WorkerFleet
from tests.invariants import check_datasets, check_job_counters
from tests.services import S3Service, wait_for


def test_sigkilled_worker_task_is_swept_and_completes_without_duplicates(
    stack: Runtime, actors: Actors, worker_fleet: WorkerFleet, s3_service: S3Service, s3_bucket: str
) -> None:
    worker_fleet.settings = stack.settings.model_copy(update={"lease_s": 3.0})
    add_company(stack.engine, name="slow", connector="synthetic",
                config={"jobs_per_day": 40, "page_size": 5, "chunk_delay_s": 0.4, "days_ahead": 1})
    first = worker_fleet.start(threads=1)
    job = plan_job(stack.engine, actors, trigger="cli", resources=["schedule"])
    assert job is not None
    task_id = job.task_ids[0]

    def task() -> SyncTask:
        with stack.engine.connect() as conn:
            return conn.execute(select(SyncTask.__table__).where(SyncTask.id == task_id)).one()  # type: ignore[return-value]

    wait_for(lambda: task().chunks >= 2, timeout=60, what="the worker to stage two chunks")
    worker_fleet.kill(first)
    killed_at = task()
    assert killed_at.status == "processing" and killed_at.chunks < 8

    worker_fleet.start(threads=1)

    def swept_to_completion() -> bool:
        sweep(stack.engine, actors, pending_grace_s=1)
        return job_progress(stack.engine, job.job_id).finished

    wait_for(swept_to_completion, timeout=90, what="the swept task to complete", interval=0.5)
    done = task()
    assert done.status == "completed" and done.record_count == 40
    assert done.attempts == 2, "the killed attempt and the one that finished"
    assert check_job_counters(stack.engine, job.job_id) == {"completed": 1}
    assert check_datasets(stack.engine, s3_service.client(), s3_bucket) == 1
