"""Things happening twice: two schedulers firing the same tick, every message published three times."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from apscheduler.events import EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from sqlalchemy import func, select

from actors.broker import make_broker
from actors.tasks import declare_actors
from pipeline.models import JOBS, TASKS, utcnow
from pipeline.runtime import Runtime
from pipeline.scheduler import build_scheduler
from tests.reliability.harness import SIZES, TINY, Harness, Size
from tests.services import wait_for

# A partition takes a moment upstream, so that the copies of a message meet a task in flight.
SLOWISH = {**TINY, "chunk_delay_s": 0.02}


@pytest.mark.parametrize("size", SIZES)
def test_two_schedulers_firing_the_same_tick_plan_one_job(make_harness: Any, size: Size) -> None:
    h: Harness = make_harness(size)
    h.add_companies(size.companies, TINY)
    h.start_workers()
    tick = utcnow().replace(microsecond=0) + timedelta(seconds=3)
    planned: list[bool] = []
    lock = threading.Lock()

    def record(event: JobExecutionEvent) -> None:
        if event.job_id == "plan":
            with lock:
                planned.append(event.retval is not None)

    # Two coordinators as `pipeline scheduler` builds them, each with its own connections; each
    # also runs the sweeper every second.
    schedulers, runtimes, brokers = [], [], []
    for _ in range(2):
        rt = Runtime.from_settings(h.rt.settings)
        actors = declare_actors(make_broker(rt.settings), rt)
        scheduler = BackgroundScheduler(timezone="UTC")
        scheduler.add_listener(record, EVENT_JOB_EXECUTED)
        build_scheduler(rt, actors, scheduler=scheduler, sync_trigger=DateTrigger(run_date=tick, timezone="UTC"),
                        sweep_interval_s=1)
        schedulers.append(scheduler)
        runtimes.append(rt)
        brokers.append(actors.broker)
    for scheduler in schedulers:
        scheduler.start()
    try:
        wait_for(lambda: len(planned) == 2, timeout=30, what="both schedulers to fire the tick")
        with h.engine.connect() as conn:
            jobs = conn.execute(select(JOBS.c.id, JOBS.c.tick_key)).all()
        assert len(jobs) == 1, f"{len(jobs)} jobs for one tick: {jobs}"
        assert sorted(planned) == [False, True]
        [(job_id, tick_key)] = jobs
        assert tick_key == f"schedule:{tick.isoformat()}"
        [report] = h.finish(job_id)
    finally:
        for scheduler in schedulers:
            scheduler.shutdown(wait=True)
        for rt, broker in zip(runtimes, brokers, strict=True):
            broker.close()
            rt.close()
    assert report.states == {"completed": size.tasks}


@pytest.mark.parametrize("size", SIZES)
def test_every_task_message_published_three_times_gives_one_result_per_task(make_harness: Any, size: Size) -> None:
    # No worker dies here: a long lease keeps a slow machine from turning a claim into two.
    h: Harness = make_harness(size, lease_s=60.0)
    h.add_companies(size.companies, SLOWISH)
    h.start_workers()
    h.start_sweeper()
    job = h.plan(dispatcher=None)
    # Each message three times in a row: the copies reach different workers at about the same time.
    h.actors.enqueue([task_id for task_id in job.task_ids for _ in range(3)], priority=job.priority)

    [report] = h.finish(job.job_id)

    assert report.states == {"completed": job.total_tasks}
    with h.engine.connect() as conn:
        claimed_twice = conn.execute(
            select(func.count()).select_from(TASKS).where(TASKS.c.job_id == job.job_id, TASKS.c.attempts != 1)
        ).scalar_one()
    assert claimed_twice == 0, "a duplicate message ran a task that was already claimed or done"
