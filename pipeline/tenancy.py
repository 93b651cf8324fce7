"""One company's view of jobs: what a tenant's manager sees through ``/v1/jobs`` and the console.

A job belongs to a company when it has tasks for it or its scope names it. Of a job that spans
companies (the hourly one) the company sees only its own tasks, and the counts, status,
progress and ETA of those tasks alone (its *slice*). Another company's job, or a job with no
task of this company, is ``NotFound`` — exactly like a job that does not exist.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, exists, func, literal, or_, select, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import ColumnElement

from pipeline.control import JobDetail, JobSummary, job_error, progress_view, task_view
from pipeline.errors import NotFound
from pipeline.events import Event, JobFeed, job_event_stream
from pipeline.models import FINISHED, JOBS, TASKS, utcnow
from pipeline.progress import JobProgress


def _scope_names(dialect: str, company_id: int) -> ColumnElement[bool]:
    """SQL: the job's scope names ``company_id`` explicitly."""
    if dialect == "postgresql":
        return type_coerce(JOBS.c.scope, JSONB)["company_ids"].contains([company_id])
    elements = func.json_each(JOBS.c.scope, "$.company_ids").table_valued("value")
    return exists(select(literal(1)).select_from(elements).where(elements.c.value == company_id))


def _belongs(dialect: str, company_id: int) -> ColumnElement[bool]:
    has_tasks = exists(select(literal(1)).where(TASKS.c.job_id == JOBS.c.id, TASKS.c.company_id == company_id))
    return or_(has_tasks, _scope_names(dialect, company_id))


def _slice_counts(
    conn: Connection, job_ids: Sequence[uuid.UUID], company_id: int
) -> dict[uuid.UUID, tuple[Counter[str], int, datetime | None]]:
    """Per job: the company's task counts by status, their records, and when the last finished."""
    rows = conn.execute(
        select(TASKS.c.job_id, TASKS.c.status, func.count(), func.coalesce(func.sum(TASKS.c.record_count), 0),
               func.max(TASKS.c.completed_at))
        .where(TASKS.c.company_id == company_id, TASKS.c.job_id.in_(job_ids))
        .group_by(TASKS.c.job_id, TASKS.c.status)
    ).all()
    out: dict[uuid.UUID, tuple[Counter[str], int, datetime | None]] = {}
    for job_id, status, count, records, last in rows:
        counts, total_records, latest = out.get(job_id, (Counter(), 0, None))
        counts[status] += count
        if status == "completed":
            total_records += int(records)
        if last is not None and (latest is None or last > latest):
            latest = last
        out[job_id] = (counts, total_records, latest)
    return out


def slice_progress(job: Any, counts: Counter[str], records: int, last_completed: datetime | None) -> JobProgress:
    """The progress of the company's tasks of ``job`` (a ``sync_jobs`` row)."""
    total = sum(counts.values())
    completed, failed, cancelled = counts["completed"], counts["failed"], counts["cancelled"]
    done = completed + failed + cancelled
    if job.planned_at is None and job.status not in FINISHED:
        status, completed_at = "planning", None  # the coordinator has not planned the tasks yet
    elif done == total:
        if job.status == "cancelled" or (cancelled and not failed):
            status = "cancelled"
        else:
            status = "failed" if failed else "completed"
        completed_at = job.completed_at or last_completed
    else:
        status = "processing" if counts["processing"] or done or job.status == "processing" else "pending"
        completed_at = None
    error = f"{failed} of {total} tasks failed" if failed and done == total else None
    return JobProgress(
        job_id=job.id, status=status, total_tasks=total, completed_tasks=completed, failed_tasks=failed,
        cancelled_tasks=cancelled, processed_records=records, started_at=job.started_at, completed_at=completed_at,
        error=error,
    )


def _summary(job: Any, progress: JobProgress, now: datetime, running: Any = None) -> JobSummary:
    return JobSummary(
        id=job.id, status=progress.status, mode=job.mode, trigger=job.trigger,
        progress=progress_view(progress, now, running=running), created_at=job.created_at,
        started_at=job.started_at, completed_at=progress.completed_at, error=job_error(progress.status, progress.error),
    )


def company_jobs(
    engine: Engine, *, company_id: int, status: str | None = None, limit: int = 50
) -> list[JobSummary]:
    """The company's most recent jobs first, each as its slice; ``status`` filters on the slice."""
    query = select(JOBS).where(_belongs(engine.dialect.name, company_id))
    if status is not None:
        # A slice can be finished while the job is not; a finished job's slice always is.
        query = query.where(JOBS.c.status.in_(("pending", "processing", status)))
    query = query.order_by(JOBS.c.created_at.desc(), JOBS.c.id).limit(limit if status is None else limit * 4)
    now = utcnow()
    with engine.connect() as conn:
        jobs = conn.execute(query).all()
        counts = _slice_counts(conn, [job.id for job in jobs], company_id) if jobs else {}
    summaries = []
    for job in jobs:
        found, records, last = counts.get(job.id, (Counter(), 0, None))
        summary = _summary(job, slice_progress(job, found, records, last), now)
        if status is None or summary.status == status:
            summaries.append(summary)
    return summaries[:limit]


def company_job_detail(engine: Engine, *, job_id: uuid.UUID, company_id: int, task_limit: int = 1000) -> JobDetail:
    """The company's slice of one job, with (up to ``task_limit`` of) its tasks.

    Raises:
        NotFound: no such job, or the job is not the company's (the same error either way).
    """
    with engine.connect() as conn:
        job = conn.execute(
            select(JOBS).where(JOBS.c.id == job_id, _belongs(engine.dialect.name, company_id))
        ).one_or_none()
        if job is None:
            raise NotFound(f"job {job_id} does not exist")
        found, records, last = _slice_counts(conn, [job_id], company_id).get(job_id, (Counter(), 0, None))
        mine = and_(TASKS.c.job_id == job_id, TASKS.c.company_id == company_id)
        tasks = conn.execute(select(TASKS).where(mine).order_by(TASKS.c.id).limit(task_limit)).all()
        running = conn.execute(
            select(TASKS.c.resource, TASKS.c.partition_key, TASKS.c.chunks, TASKS.c.fetch_state)
            .where(mine, TASKS.c.status == "processing").order_by(TASKS.c.updated_at.desc()).limit(1)
        ).first()
    summary = _summary(job, slice_progress(job, found, records, last), utcnow(), running)
    return JobDetail(**{name: getattr(summary, name) for name in JobSummary.__dataclass_fields__},
                     tasks=[task_view(row) for row in tasks])


async def company_event_stream(
    engine: Engine, feed: JobFeed, job_id: uuid.UUID, *, company_id: int, refresh_s: float = 1.0
) -> AsyncGenerator[Event, None]:
    """The live events of the company's slice of a job, in the shape of ``job_event_stream``.

    Task events of other companies are dropped; after each of the company's own task events
    (and, at most every ``refresh_s``, after the job's progress) the slice is re-read and sent
    as ``progress``. The stream ends when the slice has finished.

    Raises:
        NotFound: no such job or not the company's (before the first event).
        FeedUnavailable: the feed cannot listen (before the first event).
    """
    load = functools.partial(company_job_detail, engine, job_id=job_id, company_id=company_id, task_limit=10_000)
    detail = await asyncio.to_thread(load)  # NotFound before anything is streamed
    stream = job_event_stream(engine, feed, job_id, task_limit=0)
    try:
        await anext(stream)  # the whole job's snapshot: listening from here on
        detail = await asyncio.to_thread(load)
        yield "snapshot", asdict(detail)
        last_read = time.monotonic()
        while detail.status not in FINISHED:
            try:
                name, data = await anext(stream)
            except StopAsyncIteration:
                detail = await asyncio.to_thread(load)
                break
            if name == "keepalive":
                yield name, data
                continue
            if name == "task":
                if data.get("company_id") != company_id:
                    continue
                yield name, data
            elif name == "progress" and time.monotonic() - last_read < refresh_s and data.get("status") not in FINISHED:
                continue
            detail = await asyncio.to_thread(load)
            last_read = time.monotonic()
            yield "progress", {"status": detail.status, **asdict(detail.progress)}
        yield "end", {name: value for name, value in asdict(detail).items() if name != "tasks"}
    finally:
        await stream.aclose()
