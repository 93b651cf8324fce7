"""The coordinator on the real stack: one job per tick, lost messages re-sent, old versions collected."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from functools import partial

import dramatiq
from apscheduler.events import EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import func, select, update

from actors.tasks import Actors
from pipeline.cleanup import collect_garbage
from pipeline.companies import add_company
from pipeline.models import Company, Dataset, SyncJob, SyncTask
from pipeline.planning import plan_job
from pipeline.progress import job_progress
from pipeline.runtime import Runtime
from pipeline.scheduler import build_scheduler, latest_fire_time, run_scheduled_sync
from pipeline.sweeper import sweep
from tests.invariants import check_datasets, check_job_counters
from tests.services import S3Service, wait_for


def finished(rt: Runtime, job_id: uuid.UUID) -> bool:
    return job_progress(rt.engine, job_id).finished


def test_two_schedulers_firing_the_same_tick_plan_exactly_one_job(stack: Runtime, actors: Actors) -> None:
    add_company(stack.engine, name="a", connector="synthetic", config={"days_ahead": 1})
    now = datetime(2026, 11, 23, 10, 0, 3, tzinfo=UTC)
    trigger = CronTrigger.from_crontab("0 * * * *", timezone="UTC")
    results = []
    barrier = threading.Barrier(2)

    def fire(offset_s: float) -> None:
        barrier.wait()
        results.append(run_scheduled_sync(stack, actors, trigger, now=now + timedelta(seconds=offset_s)))

    threads = [threading.Thread(target=fire, args=(offset,)) for offset in (0.0, 41.5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(result is None for result in results) == [False, True]
    with stack.engine.connect() as conn:
        keys = conn.execute(select(SyncJob.tick_key)).scalars().all()
    assert keys == ["schedule:2026-11-23T10:00:00+00:00"]


def test_two_running_schedulers_plan_one_job_per_tick(stack: Runtime, actors: Actors) -> None:
    add_company(stack.engine, name="a", connector="synthetic", config={"days_ahead": 1})
    outcomes: list[bool] = []
    lock = threading.Lock()

    def record(event: JobExecutionEvent) -> None:
        if event.job_id == "plan":
            with lock:
                outcomes.append(event.retval is not None)

    schedulers = []
    for _ in range(2):
        scheduler = BackgroundScheduler(timezone="UTC")
        scheduler.add_listener(record, EVENT_JOB_EXECUTED)
        build_scheduler(stack, actors, scheduler=scheduler, sync_trigger=CronTrigger(second="*", timezone="UTC"),
                        sweep_interval_s=3600)
        schedulers.append(scheduler)
    for scheduler in schedulers:
        scheduler.start()
    try:
        wait_for(lambda: len(outcomes) >= 6, timeout=20, what="both schedulers to fire three ticks")
    finally:
        for scheduler in schedulers:
            scheduler.shutdown(wait=True)
    with stack.engine.connect() as conn:
        jobs = conn.execute(select(func.count()).select_from(SyncJob)).scalar_one()
        distinct_ticks = conn.execute(select(func.count(func.distinct(SyncJob.tick_key)))).scalar_one()
    assert jobs == distinct_ticks == sum(outcomes)
    assert len(outcomes) - sum(outcomes) >= 2, "the second scheduler's firings planned nothing"


def test_latest_fire_time_is_the_tick_being_run() -> None:
    trigger = CronTrigger.from_crontab("0 * * * *", timezone="UTC")
    at = datetime(2026, 11, 23, 10, 4, 59, tzinfo=UTC)
    assert latest_fire_time(trigger, at) == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def test_sweeper_resends_tasks_whose_message_was_lost(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker
) -> None:
    add_company(stack.engine, name="a", connector="synthetic", config={"days_ahead": 2, "jobs_per_day": 4})
    job = plan_job(stack.engine, None, trigger="cli")  # planned, but no message was ever sent
    assert job is not None and job.total_tasks == 3
    assert sweep(stack.engine, actors, pending_grace_s=60).lost_messages == 0, "not stale yet"
    later = datetime.now(UTC) + timedelta(seconds=61)
    report = sweep(stack.engine, actors, pending_grace_s=60, now=later)
    assert report.lost_messages == 3
    wait_for(lambda: job_progress(stack.engine, job.job_id).finished, timeout=30, what="the swept job")
    assert check_job_counters(stack.engine, job.job_id) == {"completed": 3}


def test_garbage_collection_removes_superseded_versions_and_never_the_current_one(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, s3_service: S3Service, s3_bucket: str
) -> None:
    company = add_company(stack.engine, name="a", connector="synthetic",
                          config={"days_ahead": 2, "jobs_per_day": 4}).id
    for version in range(3):
        with stack.engine.begin() as conn:
            conn.execute(update(Company).where(Company.id == company).values(
                connector_config={"days_ahead": 2, "jobs_per_day": 4, "version": version}))
        job = plan_job(stack.engine, actors, trigger="cli", resources=["schedule"])
        assert job is not None
        wait_for(partial(finished, stack, job.job_id), timeout=30, what="sync")
    client = s3_service.client()

    def published() -> list[str]:
        return [o.object_name for o in client.list_objects(s3_bucket, recursive=True)
                if not o.object_name.startswith("_staging/")]

    assert len(published()) == 6
    assert collect_garbage(stack.engine, stack.store, grace_s=3600) == 0, "within the grace period"
    # An hour later (collect_garbage takes the clock): the superseded versions are past the grace.
    later = datetime.now(UTC) + timedelta(hours=1, seconds=1)
    assert collect_garbage(stack.engine, stack.store, grace_s=3600, now=later) == 4
    with stack.engine.connect() as conn:
        current = set(conn.execute(select(Dataset.storage_key)).scalars())
        assert conn.execute(select(func.count()).select_from(SyncTask)).scalar_one() == 6
    assert set(published()) == current
    assert check_datasets(stack.engine, client, s3_bucket) == 2
