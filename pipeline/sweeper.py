"""The sweeper: re-sends tasks whose message was lost or whose worker died.

RabbitMQ only wakes workers (invariant 1). A task ``processing`` with an expired lease had
its worker killed; a task ``pending`` for longer than ``PENDING_GRACE_S`` lost its message (a
publish after the planning commit that never happened, a retry held in the memory of a worker
that died) if the queues are empty — or, under a standing backlog, if work sent more than a
grace period after it has already been taken from its queue (queues are first in, first out, so
its own message would have been delivered before: defect 13). Both are re-sent; a duplicate
costs one claim. Leases are compared with the database's clock (defect 12).

A job still ``planning`` (no tasks yet) past the grace period while the queues are empty lost
its ``coordinate_sync`` message, or its coordinator kept failing: the message is re-sent (a
duplicate finds the job planned, or waits for the plan in progress, and does nothing). A job
that is still not planned ``plan_deadline_s`` after it was submitted fails, naming why: every
job ends in bounded time.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Interval, and_, func, literal, or_, select, update

from pipeline.cleanup import id_in
from pipeline.dispatch import Dispatcher
from pipeline.jobs import db_now
from pipeline.models import JOBS, TASKS, UTCDateTime, utcnow

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SweepReport:
    expired_leases: int
    lost_messages: int
    unplanned_jobs: int = 0
    expired_plans: int = 0


def sweep(engine: Engine, dispatcher: Dispatcher, *, pending_grace_s: float, now: datetime | None = None,
          limit: int = 10_000, plan_deadline_s: float = 3600) -> SweepReport:
    """Re-send the tasks (and plans) that nothing is working on. Safe to run from several schedulers.

    ``now`` overrides the database clock (tests).
    """
    grace = timedelta(seconds=pending_grace_s)
    postgres = engine.dialect.name == "postgresql"
    clock: Any
    if postgres and now is None:
        clock = db_now(engine)
        stale: Any = clock - literal(grace, Interval())
        deadline: Any = clock - literal(timedelta(seconds=plan_deadline_s), Interval())
    else:
        moment = now or utcnow()
        clock, stale = literal(moment, UTCDateTime()), literal(moment - grace, UTCDateTime())
        deadline = literal(moment - timedelta(seconds=plan_deadline_s), UTCDateTime())
    backlog = dispatcher.backlog()
    unplanned, expired_plans = _sweep_plans(engine, dispatcher, clock=clock, stale=stale, deadline=deadline,
                                            backlog=backlog)
    # Expired leases are re-sent at once, then (if still unclaimed) once per grace period.
    expired = and_(
        TASKS.c.status == "processing",
        TASKS.c.lease_until < clock,
        or_(TASKS.c.updated_at <= TASKS.c.lease_until, TASKS.c.updated_at < stale),
    )
    # Re-sending pending tasks while the queues still hold messages would only pile up duplicates.
    lost = and_(TASKS.c.status == "pending", TASKS.c.updated_at < stale)
    if backlog and postgres:
        # Work of the same queue sent a grace period after this task was, already started.
        later = JOBS.alias("later")
        overtaken = (
            select(func.max(later.c.created_at) - literal(grace, Interval()))
            .where(later.c.priority == JOBS.c.priority, later.c.started_at.is_not(None))
            .scalar_subquery()
        )
        lost = and_(lost, TASKS.c.updated_at < overtaken)
    condition = or_(expired, lost) if postgres or not backlog else expired
    active_jobs = select(JOBS.c.id).where(JOBS.c.status.in_(("pending", "processing")))
    with engine.begin() as conn:
        rows = conn.execute(
            select(TASKS.c.id, TASKS.c.status, JOBS.c.priority)
            .join(JOBS, JOBS.c.id == TASKS.c.job_id)
            .where(condition, TASKS.c.job_id.in_(active_jobs))
            .order_by(TASKS.c.id)
            .limit(limit)
        ).all()
        if not rows:
            return SweepReport(0, 0, unplanned, expired_plans)
        # Touch them so that the next sweep leaves them alone for another grace period.
        conn.execute(update(TASKS).where(id_in(engine, TASKS.c.id, [row.id for row in rows])).values(updated_at=clock))
    by_priority: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        by_priority[row.priority].append(row.id)
    for priority, ids in by_priority.items():
        dispatcher.enqueue(ids, priority=priority)
    report = SweepReport(
        expired_leases=sum(1 for row in rows if row.status == "processing"),
        lost_messages=sum(1 for row in rows if row.status == "pending"),
        unplanned_jobs=unplanned,
        expired_plans=expired_plans,
    )
    logger.info("sweeper re-sent %s task(s): %s expired lease(s), %s lost message(s)",
                len(rows), report.expired_leases, report.lost_messages)
    return report


def _sweep_plans(engine: Engine, dispatcher: Dispatcher, *, clock: Any, stale: Any, deadline: Any,
                 backlog: int | None) -> tuple[int, int]:
    unplanned = and_(JOBS.c.status == "pending", JOBS.c.planned_at.is_(None))
    with engine.begin() as conn:
        expired = conn.execute(
            update(JOBS).where(unplanned, JOBS.c.created_at < deadline)
            .values(status="failed", planned_at=clock, completed_at=clock,
                    error_message="planning failed: the coordinator did not plan the job in time "
                                  "(are workers running?)")
            .returning(JOBS.c.id)
        ).scalars().all()
        lost = [] if backlog else conn.execute(
            select(JOBS.c.id, JOBS.c.priority).where(unplanned, JOBS.c.created_at < stale).order_by(JOBS.c.created_at)
        ).all()
    for row in lost:
        dispatcher.coordinate(row.id, priority=row.priority)
    if expired or lost:
        logger.info("sweeper re-sent %s coordinator message(s), failed %s job(s) never planned",
                    len(lost), len(expired))
    return len(lost), len(expired)
