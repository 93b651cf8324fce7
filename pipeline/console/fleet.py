"""What the Fleet page shows: queue depths, the oldest pending task, task rates, failures.

The questions of ``docs/monitoring.md`` answered for a browser; each figure is read when the
page (or its panel, every few seconds) is rendered.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from pipeline.dispatch import Dispatcher
from pipeline.models import JOBS, TASKS, utcnow


@dataclass(frozen=True, slots=True)
class QueueDepth:
    name: str
    ready: int
    delayed: int
    dead: int


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime
    count: int


def queue_depths(dispatcher: Dispatcher) -> list[QueueDepth] | None:
    """Ready, delayed (``.DQ``) and dead-lettered (``.XQ``) messages per queue; ``None`` if unknown."""
    broker: Any = getattr(dispatcher, "broker", None)
    queues: list[str] = list(getattr(dispatcher, "queues", []))
    if broker is None or not queues:
        return None
    depths = []
    for queue in queues:
        counts = getattr(broker, "get_queue_message_counts", None)
        if counts is not None:  # RabbitMQ
            ready, delayed, dead = counts(queue)
        elif hasattr(broker, "dead_letters_by_queue"):  # Dramatiq's in-process StubBroker
            from dramatiq.common import dq_name

            ready = broker.queues[queue].qsize() if queue in broker.queues else 0
            delayed_queue = broker.queues.get(dq_name(queue))
            delayed = delayed_queue.qsize() if delayed_queue is not None else 0
            dead = len(broker.dead_letters_by_queue.get(queue, ()))
        else:
            return None
        depths.append(QueueDepth(queue, int(ready), int(delayed), int(dead)))
    return depths


def oldest_pending_age_s(engine: Engine, now: datetime | None = None) -> float | None:
    with engine.connect() as conn:
        oldest = conn.execute(select(func.min(TASKS.c.created_at)).where(TASKS.c.status == "pending")).scalar()
    if oldest is None:
        return None
    if oldest.tzinfo is None:  # SQLite through an aggregate: naive UTC text
        from datetime import UTC

        oldest = datetime.fromisoformat(str(oldest)).replace(tzinfo=UTC)
    return max(0.0, ((now or utcnow()) - oldest).total_seconds())


def _buckets(engine: Engine, *, status: tuple[str, ...], since: timedelta, step: timedelta,
             now: datetime | None = None) -> list[Bucket]:
    now = now or utcnow()
    start = now - since
    with engine.connect() as conn:
        stamps = conn.execute(
            select(TASKS.c.completed_at).where(TASKS.c.status.in_(status), TASKS.c.completed_at > start)
        ).scalars().all()
    slots = int(since / step)
    counts = [0] * slots
    for stamp in stamps:
        index = int((stamp - start) / step)
        if 0 <= index < slots:
            counts[index] += 1
    return [Bucket(start + step * i, n) for i, n in enumerate(counts)]


def tasks_per_minute(engine: Engine, *, minutes: int = 15, now: datetime | None = None) -> list[Bucket]:
    """Tasks finished (completed or failed) in each of the last ``minutes`` minutes."""
    return _buckets(engine, status=("completed", "failed"), since=timedelta(minutes=minutes),
                    step=timedelta(minutes=1), now=now)


def failed_per_hour(engine: Engine, *, hours: int = 24, now: datetime | None = None) -> list[Bucket]:
    """Tasks that failed for good in each of the last ``hours`` hours."""
    return _buckets(engine, status=("failed",), since=timedelta(hours=hours), step=timedelta(hours=1), now=now)


def failed_jobs_last_day(engine: Engine, *, limit: int = 20) -> list[Any]:
    """The monitoring question "failed jobs of the last day, with their first task error"."""
    first_error = (
        select(TASKS.c.error_message).where(TASKS.c.job_id == JOBS.c.id, TASKS.c.status == "failed")
        .order_by(TASKS.c.id).limit(1).scalar_subquery()
    )
    with engine.connect() as conn:
        return list(conn.execute(
            select(JOBS.c.id, JOBS.c.trigger, JOBS.c.completed_at, JOBS.c.failed_tasks, JOBS.c.total_tasks,
                   first_error.label("first_task_error"))
            .where(JOBS.c.status == "failed", JOBS.c.completed_at > utcnow() - timedelta(days=1))
            .order_by(JOBS.c.completed_at.desc()).limit(limit)
        ).all())


def bar_chart(buckets: list[Bucket], *, width: int = 480, height: int = 80, label: str = "") -> str:
    """A small inline SVG bar chart (no script, no library); numbers only, safe to embed."""
    top = max((b.count for b in buckets), default=0) or 1
    gap = 2
    bar_w = max(1.0, (width - gap * len(buckets)) / max(1, len(buckets)))
    bars = []
    for i, bucket in enumerate(buckets):
        h = round((height - 14) * bucket.count / top, 1)
        x = round(i * (bar_w + gap), 1)
        bars.append(f'<rect x="{x}" y="{height - h}" width="{round(bar_w, 1)}" height="{h}">'
                    f"<title>{bucket.start:%H:%M}: {bucket.count}</title></rect>")
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(label)}"><text x="0" y="10" class="axis">max {top}</text>{"".join(bars)}</svg>')
