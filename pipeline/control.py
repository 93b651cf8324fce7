"""Job control: submitting a job under the unfinished-jobs cap, cancelling, retrying, and the
views of jobs, tasks and logs that the control API and the CLI show.

Cancel and retry are each one transaction. Cancelling marks the job's pending and processing
tasks ``cancelled``; a worker still running one of them finds out at its next fenced write
(``pipeline.jobs._fenced`` raises ``TaskCancelled``), which is a chunk boundary or the publish
transaction — rolled back, so nothing is half-published.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, exists, func, literal, or_, select, text, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import ColumnElement

from pipeline import metrics
from pipeline.cleanup import id_in
from pipeline.dispatch import Dispatcher
from pipeline.errors import NotFound, PipelineError
from pipeline.jobs import log
from pipeline.models import FINISHED, JOB_LOG, JOBS, TASKS, Company, job_status, utcnow
from pipeline.planning import LOG_NAMES, PLAN_LOCK, SubmittedJob, create_job, open_partitions
from pipeline.progress import JobProgress

logger = logging.getLogger(__name__)
UNFINISHED = ("pending", "processing")
# pg_advisory_xact_lock key serialising "check the cap, then plan" across API processes.
SUBMIT_LOCK_KEY = 0x5059_4E43_5355_424D  # "PYNCSUBM"
_submit_lock = threading.Lock()


class TooManyJobs(PipelineError):
    """A company in the request already has the maximum number of unfinished jobs."""


class InvalidJobState(PipelineError):
    """The job is not in a state that allows the operation (cancel a finished job, retry a running one)."""


@dataclass(frozen=True, slots=True)
class ErrorView:
    """An error as clients get it: ``code`` from ``pipeline.error_codes.CODES``, ``message`` readable."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ProgressView:
    percent: float
    total_tasks: int
    completed_tasks: int
    failed_tasks: int
    cancelled_tasks: int
    processed_records: int
    eta_seconds: float | None
    message: str = ""
    """What is happening, in words: "schedule 2026-12-03: chunk 4, 180 records"."""


@dataclass(frozen=True, slots=True)
class TaskView:
    id: int
    company_id: int
    resource: str
    partition: str
    status: str
    attempts: int
    record_count: int
    chunks: int
    error: ErrorView | None


@dataclass(frozen=True, slots=True)
class JobSummary:
    id: uuid.UUID
    status: str
    mode: str
    trigger: str
    progress: ProgressView
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error: ErrorView | None


@dataclass(frozen=True, slots=True)
class JobDetail(JobSummary):
    tasks: list[TaskView]


@dataclass(frozen=True, slots=True)
class LogEntry:
    id: int
    task_id: int | None
    level: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CancelResult:
    job_id: uuid.UUID
    status: str
    cancelled_tasks: int


@dataclass(frozen=True, slots=True)
class RetryResult:
    job_id: uuid.UUID
    status: str
    retried_tasks: int
    priority: str


def progress_message(progress: JobProgress, running: Any = None) -> str:
    """The job's progress in words; ``running`` is a task row being worked on, if any."""
    total, done = progress.total_tasks, progress.done_tasks
    if progress.status == "completed":
        return f"completed: {total} of {total} tasks, {progress.processed_records} records"
    if progress.status == "failed":
        return f"failed: {progress.failed_tasks} of {total} tasks failed, {progress.processed_records} records"
    if progress.status == "cancelled":
        return f"cancelled after {progress.completed_tasks} of {total} tasks"
    if running is not None:
        records = int((running.fetch_state or {}).get("records", 0))
        return (f"{running.resource} {running.partition_key}: chunk {running.chunks + 1}, {records} records"
                f" ({done} of {total} tasks done)")
    if progress.status == "pending" or done == 0:
        return f"waiting for a worker: {total - done} task(s) queued"
    return f"{done} of {total} tasks done, {progress.processed_records} records"


def progress_view(progress: JobProgress, now: datetime | None = None, *, running: Any = None) -> ProgressView:
    return ProgressView(
        percent=progress.percent, total_tasks=progress.total_tasks, completed_tasks=progress.completed_tasks,
        failed_tasks=progress.failed_tasks, cancelled_tasks=progress.cancelled_tasks,
        processed_records=progress.processed_records, eta_seconds=progress.eta_seconds(now),
        message=progress_message(progress, running),
    )


def task_error(status: str, message: str | None, code: str | None) -> ErrorView | None:
    """A task's error as ``{code, message}``; a cancelled task says so even without a message."""
    if message:
        return ErrorView(code=code or "internal", message=message)
    if status == "cancelled":
        return ErrorView(code="cancelled", message="cancelled before it finished")
    return None


def job_error(status: str, message: str | None) -> ErrorView | None:
    """A job's error: its failed tasks (each has its own code), or its cancellation."""
    if message:
        return ErrorView(code="tasks_failed", message=message)
    if status == "cancelled":
        return ErrorView(code="cancelled", message="the job was cancelled")
    return None


def job_progress_of(row: Any) -> JobProgress:
    """The ``JobProgress`` of a ``sync_jobs`` row."""
    return JobProgress(
        job_id=row.id, status=job_status(row.status, row.planned_at), total_tasks=row.total_tasks,
        completed_tasks=row.completed_tasks,
        failed_tasks=row.failed_tasks, cancelled_tasks=row.cancelled_tasks,
        processed_records=row.processed_records, started_at=row.started_at, completed_at=row.completed_at,
        error=row.error_message,
    )


def summary_of(row: Any, now: datetime | None = None, *, running: Any = None) -> JobSummary:
    return JobSummary(
        id=row.id, status=job_status(row.status, row.planned_at), mode=row.mode, trigger=row.trigger,
        progress=progress_view(job_progress_of(row), now, running=running), created_at=row.created_at,
        started_at=row.started_at, completed_at=row.completed_at, error=job_error(row.status, row.error_message),
    )


def task_view(row: Any) -> TaskView:
    return TaskView(
        id=row.id, company_id=row.company_id, resource=row.resource, partition=row.partition_key,
        status=row.status, attempts=row.attempts, record_count=row.record_count, chunks=row.chunks,
        error=task_error(row.status, row.error_message, row.error_code),
    )


# --- submitting ---------------------------------------------------------------------------------


def check_job_cap(conn: Connection, *, company_ids: Sequence[int] | None, cap: int) -> None:
    """Refuse a job for companies that already have ``cap`` unfinished jobs.

    A job counts for a company when its scope names the company or names no company at all
    (every enabled company). ``company_ids`` empty or ``None`` asks for every enabled company.

    Raises:
        TooManyJobs: naming the companies at the cap.
    """
    for_everyone = 0
    per_company: Counter[int] = Counter()
    for scope in conn.execute(select(JOBS.c.scope).where(JOBS.c.status.in_(UNFINISHED))).scalars():
        named = (scope or {}).get("company_ids") or []
        if named:
            per_company.update(set(named))
        else:
            for_everyone += 1
    if company_ids:
        targets = set(company_ids)
    else:
        if for_everyone >= cap:
            raise TooManyJobs(f"{for_everyone} unfinished job(s) already cover every company (limit {cap})")
        candidates = [c for c, n in per_company.items() if for_everyone + n >= cap]
        targets = set(conn.execute(
            select(Company.id).where(id_in(conn.engine, Company.__table__.c.id, candidates),
                                     Company.sync_enabled.is_(True))
        ).scalars()) if candidates else set()
    over = sorted(c for c in targets if for_everyone + per_company[c] >= cap)
    if over:
        counts = ", ".join(f"company {c} has {for_everyone + per_company[c]}" for c in over)
        raise TooManyJobs(f"too many unfinished jobs: {counts} (limit {cap}); wait for one to finish or cancel one")


def submit_job(
    engine: Engine,
    dispatcher: Dispatcher | None,
    *,
    trigger: str,
    max_unfinished: int,
    mode: str = "full",
    company_ids: Sequence[int] | None = None,
    resources: Sequence[str] | None = None,
    partitions: Sequence[str] | None = None,
    priority: str | None = None,
) -> SubmittedJob:
    """Submit a job unless a company in scope is at the unfinished-jobs cap, then send its
    ``coordinate_sync`` message: the coordinator actor plans its tasks (status "planning" until then).

    The check and the job's insert are serialised (a lock per process, plus on PostgreSQL an
    advisory lock across processes), so concurrent requests cannot overshoot the cap. The
    message is sent after the locks are released; if it is lost, the sweeper re-sends it.

    Raises:
        TooManyJobs: a company in scope already has ``max_unfinished`` unfinished jobs.
        NotFound / ConfigError: as ``pipeline.planning.create_job``.
    """
    with _submit_lock, engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # held until this transaction ends: after the job is committed
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SUBMIT_LOCK_KEY})
        check_job_cap(conn, company_ids=company_ids, cap=max_unfinished)
        submitted = create_job(conn, trigger=trigger, mode=mode, company_ids=company_ids, resources=resources,
                               partitions=partitions, priority=priority)
    assert submitted is not None  # no tick key: never a duplicate
    if dispatcher is not None:
        send_coordinate(engine, dispatcher, submitted.job_id, priority=submitted.priority)
    return submitted


def send_coordinate(engine: Engine, dispatcher: Dispatcher, job_id: uuid.UUID, *, priority: str) -> bool:
    """Send a committed job's ``coordinate_sync`` message; if the broker refuses, say so and carry on.

    As for ``send_committed``: the job stands, and the sweeper re-sends the coordinator message
    of a job still planning past the grace period. Returns whether the message was sent.
    """
    try:
        dispatcher.coordinate(job_id, priority=priority)
    except Exception as exc:  # whatever the broker raised, the committed job stands
        logger.warning("job %s: could not send its coordinator message, the sweeper will: %s", job_id, exc)
        try:
            with engine.begin() as conn:
                log(conn, job_id, None, "warning",
                    f"the coordinator message could not be sent ({type(exc).__name__}); the sweeper will send it",
                    {"event": "enqueue_failed", "tasks": 0})
        except Exception:
            logger.exception("job %s: could not log the failed enqueue", job_id)
        return False
    return True


def send_committed(
    engine: Engine, dispatcher: Dispatcher, job_id: uuid.UUID, task_ids: Sequence[int], *, priority: str
) -> bool:
    """Enqueue the messages of committed tasks; if the broker refuses, say so and carry on.

    The job is committed: answering an error would make the client retry and create a duplicate
    job (defect 14), while the sweeper delivers pending tasks whose messages never went out.
    Returns whether the messages were sent.
    """
    try:
        dispatcher.enqueue(task_ids, priority=priority)
    except Exception as exc:  # whatever the broker raised, the committed job stands
        logger.warning("job %s: could not enqueue %s task(s), the sweeper will: %s", job_id, len(task_ids), exc)
        try:
            with engine.begin() as conn:
                log(conn, job_id, None, "warning",
                    f"messages for {len(task_ids)} task(s) could not be sent ({type(exc).__name__}); "
                    "the sweeper will send them", {"event": "enqueue_failed", "tasks": len(task_ids)})
        except Exception:
            logger.exception("job %s: could not log the failed enqueue", job_id)
        return False
    return True


# --- cancel and retry ---------------------------------------------------------------------------


def _cancel_open_tasks(conn: Connection, job_id: uuid.UUID, now: datetime) -> Counter[str]:
    rows = conn.execute(
        update(TASKS)
        .where(TASKS.c.job_id == job_id, TASKS.c.status.in_(UNFINISHED))
        .values(status="cancelled", lease_until=None, lease_token=None, updated_at=now, completed_at=now)
        .returning(TASKS.c.resource)
    ).scalars().all()
    return Counter(rows)


def cancel_job(engine: Engine, *, job_id: uuid.UUID, requested_by: str = "api") -> CancelResult:
    """Cancel an unfinished job: its pending and processing tasks become ``cancelled`` at once.

    Running tasks stop at their next chunk boundary; their publish, if in flight, rolls back.

    Raises:
        NotFound: no such job.
        InvalidJobState: the job has already finished.
    """
    now = utcnow()
    with engine.begin() as conn:
        # Tasks first, then the job row: the order a worker's publish transaction locks them in.
        cancelled = _cancel_open_tasks(conn, job_id, now)
        job = conn.execute(select(JOBS).where(JOBS.c.id == job_id).with_for_update()).one_or_none()
        if job is None:
            raise NotFound(f"job {job_id} does not exist")
        if job.status in FINISHED:
            raise InvalidJobState(f"job {job_id} has already finished ({job.status})")
        # A retry may have re-opened tasks between the first pass and the job lock.
        cancelled += _cancel_open_tasks(conn, job_id, now)
        count = sum(cancelled.values())
        error = (f"{job.failed_tasks} of {job.total_tasks} tasks failed before the job was cancelled"
                 if job.failed_tasks else None)
        conn.execute(
            update(JOBS).where(JOBS.c.id == job_id)
            .values(status="cancelled", cancelled_tasks=JOBS.c.cancelled_tasks + count, completed_at=now,
                    error_message=error)
        )
        log(conn, job_id, None, "info", f"cancelled by {requested_by}: {count} open task(s) cancelled",
            {"event": "cancel", "requested_by": requested_by, "cancelled_tasks": count})
    metrics.tasks_cancelled(cancelled)
    return CancelResult(job_id=job_id, status="cancelled", cancelled_tasks=count)


def retry_job(
    engine: Engine, dispatcher: Dispatcher | None, *, job_id: uuid.UUID, requested_by: str = "api"
) -> RetryResult:
    """Send a finished job's failed and cancelled tasks back to work.

    Those tasks become ``pending`` with their attempts, lease, cursor and error cleared; the job
    becomes ``processing`` again with its counters adjusted; the tasks are enqueued with the
    job's priority after the commit. A task whose partition has an open (pending or processing)
    task in another job is left as it is, as planning leaves such a partition (two open tasks
    would both publish: issue 11, defect 7); the job's log names the partitions left and why.
    On PostgreSQL this holds the planning lock (``pipeline.planning.PLAN_LOCK``) until the
    commit, so a plan and a retry at the same moment each see the other's open tasks.

    Raises:
        NotFound: no such job.
        InvalidJobState: the job is still running, has no failed or cancelled task, or every
            such task's partition has an open task in another job.
    """
    now = utcnow()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": PLAN_LOCK})
        job = conn.execute(select(JOBS).where(JOBS.c.id == job_id).with_for_update()).one_or_none()
        if job is None:
            raise NotFound(f"job {job_id} does not exist")
        if job.status not in FINISHED:
            raise InvalidJobState(f"job {job_id} is still {job.status}; only a finished job can be retried")
        candidates = conn.execute(
            select(TASKS.c.id, TASKS.c.status, TASKS.c.company_id, TASKS.c.resource, TASKS.c.partition_key)
            .where(TASKS.c.job_id == job_id, TASKS.c.status.in_(("failed", "cancelled")))
            .order_by(TASKS.c.id)
        ).all()
        if not candidates:
            raise InvalidJobState(f"job {job_id} has no failed or cancelled task to retry")
        busy = open_partitions(conn, sorted({row.company_id for row in candidates}))
        left = [row for row in candidates if (row.company_id, row.resource, row.partition_key) in busy]
        left_ids = {row.id for row in left}
        retried = [row for row in candidates if row.id not in left_ids]
        names = [f"{row.company_id}/{row.resource}/{row.partition_key}" for row in left]
        more = f" and {len(names) - LOG_NAMES} more" if len(names) > LOG_NAMES else ""
        shown = ", ".join(names[:LOG_NAMES]) + more
        if not retried:
            raise InvalidJobState(
                f"job {job_id} has no failed or cancelled task to retry: the partition of every one "
                f"({len(left)}) has an open task in another job: {shown}")
        before = Counter(row.status for row in retried)
        task_ids = [row.id for row in retried]
        conn.execute(
            update(TASKS)
            .where(id_in(engine, TASKS.c.id, task_ids), TASKS.c.status.in_(("failed", "cancelled")))
            .values(status="pending", attempts=0, lease_until=None, lease_token=None, error_message=None,
                    error_code=None, fetch_state=None, chunks=0, record_count=0, completed_at=None, updated_at=now)
        )
        conn.execute(
            update(JOBS).where(JOBS.c.id == job_id)
            .values(status="processing", completed_at=None, error_message=None,
                    failed_tasks=JOBS.c.failed_tasks - before["failed"],
                    cancelled_tasks=JOBS.c.cancelled_tasks - before["cancelled"],
                    started_at=func.coalesce(JOBS.c.started_at, now))
        )
        log(conn, job_id, None, "info",
            f"retried by {requested_by}: {before['failed']} failed and {before['cancelled']} cancelled task(s) "
            "sent back to work",
            {"event": "retry", "requested_by": requested_by, "failed": before["failed"],
             "cancelled": before["cancelled"]})
        if left:
            log(conn, job_id, None, "warning",
                f"retry left {len(left)} task(s) as they are: their partition has an open task in another job, "
                f"which is left to finish (two open tasks of a partition would both publish): {shown}",
                {"event": "retry_skipped_open_partitions", "count": len(left), "partitions": names[:LOG_NAMES]})
    if dispatcher is not None:
        send_committed(engine, dispatcher, job_id, task_ids, priority=job.priority)
    return RetryResult(job_id=job_id, status="processing", retried_tasks=len(task_ids), priority=job.priority)


# --- views --------------------------------------------------------------------------------------


def _scope_includes(dialect: str, company_id: int) -> ColumnElement[bool]:
    """SQL: the job's scope names ``company_id`` or names no company (every company)."""
    if dialect == "postgresql":
        named = type_coerce(JOBS.c.scope, JSONB)["company_ids"]
        return or_(named.contains([company_id]), func.jsonb_array_length(named) == 0)
    elements = func.json_each(JOBS.c.scope, "$.company_ids").table_valued("value")
    return or_(
        func.coalesce(func.json_array_length(JOBS.c.scope, "$.company_ids"), 0) == 0,
        exists(select(literal(1)).select_from(elements).where(elements.c.value == company_id)),
    )


def list_jobs(
    engine: Engine, *, status: str | None = None, company_id: int | None = None, limit: int = 50
) -> list[JobSummary]:
    """The most recent jobs first, optionally only those with ``status`` or covering ``company_id``."""
    query = select(JOBS).order_by(JOBS.c.created_at.desc(), JOBS.c.id).limit(limit)
    conditions = []
    if status is not None:
        conditions.append(JOBS.c.status == status)
    if company_id is not None:
        conditions.append(_scope_includes(engine.dialect.name, company_id))
    if conditions:
        query = query.where(and_(*conditions))
    now = utcnow()
    with engine.connect() as conn:
        return [summary_of(row, now) for row in conn.execute(query)]


def load_job_detail(conn: Connection, job_id: uuid.UUID, *, task_limit: int) -> JobDetail:
    """The job and (up to ``task_limit`` of) its tasks, read on ``conn``.

    Raises:
        NotFound: no such job.
    """
    job = conn.execute(select(JOBS).where(JOBS.c.id == job_id)).one_or_none()
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    tasks = conn.execute(
        select(TASKS).where(TASKS.c.job_id == job_id).order_by(TASKS.c.id).limit(task_limit)
    ).all()
    running = None
    if job.status == "processing":
        running = conn.execute(
            select(TASKS.c.resource, TASKS.c.partition_key, TASKS.c.chunks, TASKS.c.fetch_state)
            .where(TASKS.c.job_id == job_id, TASKS.c.status == "processing")
            .order_by(TASKS.c.updated_at.desc()).limit(1)
        ).first()
    summary = summary_of(job, running=running)
    return JobDetail(
        id=summary.id, status=summary.status, mode=summary.mode, trigger=summary.trigger,
        progress=summary.progress, created_at=summary.created_at, started_at=summary.started_at,
        completed_at=summary.completed_at, error=summary.error, tasks=[task_view(row) for row in tasks],
    )


def job_detail(engine: Engine, *, job_id: uuid.UUID, task_limit: int = 1000) -> JobDetail:
    """A job's status, progress with ETA, and its first ``task_limit`` tasks (by id).

    Raises:
        NotFound: no such job.
    """
    with engine.connect() as conn:
        return load_job_detail(conn, job_id, task_limit=task_limit)


def job_logs(
    engine: Engine, *, job_id: uuid.UUID, after_id: int = 0, limit: int = 500, level: str | None = None
) -> list[LogEntry]:
    """A job's log (attempt errors, continuations, cancellations, retries), oldest first.

    ``after_id`` pages on from the last entry seen.

    Raises:
        NotFound: no such job.
    """
    query = (select(JOB_LOG).where(JOB_LOG.c.job_id == job_id, JOB_LOG.c.id > after_id)
             .order_by(JOB_LOG.c.id).limit(limit))
    if level is not None:
        query = query.where(JOB_LOG.c.level == level)
    with engine.connect() as conn:
        if conn.execute(select(JOBS.c.id).where(JOBS.c.id == job_id)).first() is None:
            raise NotFound(f"job {job_id} does not exist")
        rows = conn.execute(query).all()
    return [LogEntry(id=r.id, task_id=r.task_id, level=r.level, message=r.message, data=r.data,
                     created_at=r.created_at) for r in rows]
