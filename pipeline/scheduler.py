"""The scheduler: APScheduler firing the hourly sync, the sweeper and the daily cleanup.

A tick only inserts the job row (``pending``, its scope and tick key) and sends one
``coordinate_sync`` message; the coordinator actor, on a worker, plans the tasks and sends
them. So a tick takes milliseconds whatever the number of companies.

APScheduler 3 cannot share a job store between schedulers, so two scheduler processes each
fire every job. The job is guarded by a unique key per tick (``sync_jobs.tick_key``): the
second scheduler's insert of the same tick does nothing, so one job per tick, on PostgreSQL
and SQLite alike. The sweeper and cleanup are idempotent and safe to run twice.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from pipeline.cleanup import cleanup
from pipeline.dispatch import Dispatcher
from pipeline.models import utcnow
from pipeline.planning import SubmittedJob, create_job
from pipeline.runtime import Runtime
from pipeline.sweeper import sweep

logger = logging.getLogger(__name__)
MISFIRE_GRACE_S = 600


def latest_fire_time(trigger: BaseTrigger, now: datetime, *, lookback_s: float = MISFIRE_GRACE_S) -> datetime:
    """The most recent time ``trigger`` fired at or before ``now`` (the tick being run)."""
    fire = trigger.get_next_fire_time(None, now - timedelta(seconds=lookback_s))
    latest = now.replace(second=0, microsecond=0)
    while fire is not None and fire <= now:
        latest = fire
        fire = trigger.get_next_fire_time(fire, fire + timedelta(microseconds=1))
    return latest


def run_scheduled_sync(
    rt: Runtime, dispatcher: Dispatcher, trigger: BaseTrigger, *, now: datetime | None = None
) -> SubmittedJob | None:
    """Submit the job of the current tick to the coordinator, unless another scheduler already did."""
    tick = latest_fire_time(trigger, now or utcnow())
    with rt.engine.begin() as conn:
        job = create_job(conn, trigger="schedule", mode="full", tick_key=f"schedule:{tick.isoformat()}")
    if job is None:
        logger.info("tick %s already submitted by another scheduler", tick.isoformat())
        return None
    dispatcher.coordinate(job.job_id, priority=job.priority)
    logger.info("tick %s submitted job %s to the coordinator", tick.isoformat(), job.job_id)
    return job


def build_scheduler(
    rt: Runtime,
    dispatcher: Dispatcher,
    *,
    scheduler: BaseScheduler | None = None,
    sync_trigger: BaseTrigger | None = None,
    sweep_interval_s: float = 60,
) -> BaseScheduler:
    """Register the three recurring jobs on ``scheduler`` (a blocking one by default)."""
    scheduler = scheduler or BlockingScheduler(timezone="UTC")
    trigger = sync_trigger or CronTrigger.from_crontab(rt.settings.schedule_cron, timezone="UTC")
    common = {"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_S}
    scheduler.add_job(run_scheduled_sync, trigger, args=[rt, dispatcher, trigger], id="plan", **common)
    scheduler.add_job(
        sweep, IntervalTrigger(seconds=sweep_interval_s), id="sweep",
        kwargs={"engine": rt.engine, "dispatcher": dispatcher, "pending_grace_s": rt.settings.pending_grace_s},
        **common,
    )
    scheduler.add_job(
        cleanup, CronTrigger(hour=3, minute=17, timezone="UTC"), id="cleanup",
        kwargs={"engine": rt.engine, "store": rt.store, "retention_days": rt.settings.retention_days,
                "grace_s": rt.settings.gc_grace_s, "task_retention_days": rt.settings.task_retention_days},
        **common,
    )
    return scheduler
