"""Task and job state transitions. Every transition is one statement or one transaction.

Postgres is the source of truth for work (DESIGN invariant 1). A worker owns a task only
while it holds a lease; every write it makes is fenced by the lease token it got at claim,
so a worker whose lease expired and was taken over can no longer touch the task or its job.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy import CTE, Connection, Engine, Interval, and_, case, exists, func, insert, literal, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from pipeline.db import execute_one
from pipeline.errors import LeaseLost, TaskCancelled
from pipeline.models import COMPANIES, DATASETS, FINISHED, JOB_LOG, JOBS, TASKS, UTCDateTime, utcnow

# How much of an error message is kept on the task and in the job log.
MESSAGE_LIMIT = 2000


@dataclass(frozen=True, slots=True)
class Claim:
    """A worker's hold on one task: what it needs to run it and the token fencing its writes."""

    task_id: int
    job_id: uuid.UUID
    company_id: int
    external_id: str | None
    connector: str
    connector_config: dict[str, Any]
    resource: str
    partition: str
    mode: str
    attempts: int
    chunks: int
    fetch_state: dict[str, Any] | None
    token: str
    # The checksum of the partition's current version when this claim was made (None: none):
    # a lineage's first claim records it, and publishing compare-and-swaps on it.
    base_checksum: str | None = None


def clean_text(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` as PostgreSQL can store it: no NUL, no lone surrogate, at most ``limit`` characters.

    Upstream messages, body excerpts and exception texts go into ``error_message`` and the job
    log; a NUL there made psycopg raise ``DataError`` and strand the task (issue 11, defect 3).
    """
    text = text.replace("\x00", "\\0")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:limit]


def db_now(engine_or_conn: Engine | Connection, plus_s: float = 0.0) -> ColumnElement[Any]:
    """The database's clock (``clock_timestamp()``), plus ``plus_s`` seconds, on PostgreSQL, so
    leases never depend on a host's wall clock (defect 12); this process's clock on SQLite (one
    host by construction)."""
    if engine_or_conn.dialect.name == "postgresql":
        now = func.clock_timestamp()
        return now + literal(timedelta(seconds=plus_s), Interval()) if plus_s else now
    return literal(utcnow() + timedelta(seconds=plus_s), UTCDateTime())


def claim_task(engine: Engine, task_id: int, *, lease_s: float, max_attempts: int | None = None) -> Claim | None:
    """Atomically take a task that is pending or whose lease expired.

    Leases are measured on the database's clock. A task whose lease expired on its last allowed
    attempt (``max_attempts``) is not claimed: it is failed with its last error and counted on
    its job in one transaction (``fail_exhausted``), so a worker killed mid-attempt (OOM, time
    limit) cannot make the task be re-claimed forever (defect 2).

    Returns ``None`` (the message is to be acknowledged and ignored) when the task does not
    exist, is finished, is leased by a live worker, or has just been failed for good.
    """
    token = uuid.uuid4().hex
    if engine.dialect.name == "postgresql":
        row = _claim_in_one_statement(engine, task_id, token, lease_s=lease_s, max_attempts=max_attempts)
    else:
        row = _claim_in_steps(engine, task_id, token, lease_s=lease_s, max_attempts=max_attempts)
    if row is None:
        if max_attempts is not None:
            fail_exhausted(engine, task_id, max_attempts=max_attempts)
        return None
    return Claim(
        task_id=task_id,
        job_id=row.job_id,
        company_id=row.company_id,
        external_id=row.external_id,
        connector=row.connector,
        connector_config=dict(row.connector_config or {}),
        resource=row.resource,
        partition=row.partition_key,
        mode=row.mode,
        attempts=row.attempts,
        chunks=row.chunks,
        fetch_state=row.fetch_state,
        token=token,
        base_checksum=row.base_checksum,
    )


def _claim_statement(engine: Engine, task_id: int, token: str, *, lease_s: float, max_attempts: int | None) -> Any:
    """The claim as an ``UPDATE ... RETURNING`` (the SQLite path; ``CLAIM_SQL`` on PostgreSQL)."""
    now = db_now(engine)
    expired = and_(TASKS.c.status == "processing", TASKS.c.lease_until < now)
    if max_attempts is not None:
        expired = and_(expired, TASKS.c.attempts < max_attempts)
    claimable = or_(TASKS.c.status == "pending", expired)
    statement = (
        update(TASKS)
        .where(TASKS.c.id == task_id, claimable)
        .values(
            status="processing",
            lease_until=db_now(engine, lease_s),
            lease_token=token,
            attempts=TASKS.c.attempts + 1,
            updated_at=now,
            started_at=case((TASKS.c.started_at.is_(None), now), else_=TASKS.c.started_at),
        )
        .returning(
            TASKS.c.job_id, TASKS.c.company_id, TASKS.c.resource, TASKS.c.partition_key,
            TASKS.c.attempts, TASKS.c.chunks, TASKS.c.fetch_state,
        )
    )
    return statement


def fail_exhausted(engine: Engine, task_id: int, *, max_attempts: int) -> bool:
    """Fail a task whose lease expired on its last allowed attempt, with its last error, and count
    it on its job — one transaction. Returns whether it did (False: not such a task)."""
    with engine.begin() as conn:
        now = db_now(conn)
        row = conn.execute(
            update(TASKS)
            .where(TASKS.c.id == task_id, TASKS.c.status == "processing", TASKS.c.lease_until < now,
                   TASKS.c.attempts >= max_attempts)
            .values(status="failed", lease_until=None, lease_token=None, updated_at=now, completed_at=now)
            .returning(TASKS.c.job_id, TASKS.c.attempts, TASKS.c.error_message)
        ).one_or_none()
        if row is None:
            return False
        last = row.error_message or "no error was recorded (the worker was killed or lost)"
        message = clean_text(f"attempt {row.attempts} of {max_attempts} did not finish before its lease expired; "
                             f"no attempts left; last error: {last}")
        conn.execute(update(TASKS).where(TASKS.c.id == task_id).values(error_message=message,
                                                                        error_code="worker_lost"))
        log(conn, row.job_id, task_id, "error", message, {"attempt": row.attempts, "final": True})
        bump_job(conn, row.job_id, failed=1, now=utcnow())
    return True


CLAIM_SQL = """
WITH claimed AS (
    UPDATE sync_tasks
       SET status = 'processing', lease_until = clock_timestamp() + make_interval(secs => %(lease_s)s),
           lease_token = %(token)s, attempts = attempts + 1, updated_at = clock_timestamp(),
           started_at = coalesce(started_at, clock_timestamp())
     WHERE id = %(task_id)s
       AND (status = 'pending' OR (status = 'processing' AND lease_until < clock_timestamp()
                                   AND attempts < coalesce(%(max_attempts)s::integer, 2147483647)))
    RETURNING job_id, company_id, resource, partition_key, attempts, chunks, fetch_state
), started AS (
    UPDATE sync_jobs SET status = 'processing', started_at = clock_timestamp()
     WHERE id = (SELECT job_id FROM claimed) AND status = 'pending'
)
SELECT claimed.*, j.mode, c.external_id, c.connector, c.connector_config, d.checksum_sha256 AS base_checksum
  FROM claimed
  JOIN sync_jobs j ON j.id = claimed.job_id
  JOIN companies c ON c.id = claimed.company_id
  LEFT JOIN datasets d ON d.company_id = claimed.company_id AND d.resource = claimed.resource
                      AND d.partition_key = claimed.partition_key
"""


def _claim_in_one_statement(engine: Engine, task_id: int, token: str, *, lease_s: float,
                            max_attempts: int | None) -> Any:
    """PostgreSQL: claim, mark the job started and read what the worker needs in ONE statement
    (data-modifying CTEs), in autocommit: one round trip on the hottest path of the fleet, and
    no BEGIN or COMMIT. The statement is plain SQL (``CLAIM_SQL``, the same conditions as the
    SQLite path's ``update``), so no per-call SQL construction or compilation costs CPU, and
    psycopg prepares it once per connection (``pipeline.db.PREPARE_THRESHOLD``)."""
    params = {"task_id": task_id, "token": token, "lease_s": float(lease_s), "max_attempts": max_attempts}
    return execute_one(engine, CLAIM_SQL, params)


def _dataset_of(company_id: Any, resource: Any, partition: Any) -> ColumnElement[bool]:
    return and_(DATASETS.c.company_id == company_id, DATASETS.c.resource == resource,
                DATASETS.c.partition_key == partition)


def _claim_in_steps(engine: Engine, task_id: int, token: str, *, lease_s: float, max_attempts: int | None) -> Any:
    """SQLite has no data-modifying CTEs: the same claim as a few statements in one transaction,
    ending with one read of the row the one-statement claim returns."""
    claim = _claim_statement(engine, task_id, token, lease_s=lease_s, max_attempts=max_attempts)
    now = db_now(engine)
    with engine.begin() as conn:
        claimed = conn.execute(claim).one_or_none()
        if claimed is None:
            return None
        conn.execute(
            update(JOBS).where(JOBS.c.id == claimed.job_id, JOBS.c.status == "pending")
            .values(status="processing", started_at=now)
        )
        return conn.execute(
            select(TASKS.c.job_id, TASKS.c.company_id, TASKS.c.resource, TASKS.c.partition_key, TASKS.c.attempts,
                   TASKS.c.chunks, TASKS.c.fetch_state, JOBS.c.mode, COMPANIES.c.external_id,
                   COMPANIES.c.connector, COMPANIES.c.connector_config,
                   DATASETS.c.checksum_sha256.label("base_checksum"))
            .join(JOBS, JOBS.c.id == TASKS.c.job_id)
            .join(COMPANIES, COMPANIES.c.id == TASKS.c.company_id)
            .outerjoin(DATASETS, _dataset_of(TASKS.c.company_id, TASKS.c.resource, TASKS.c.partition_key))
            .where(TASKS.c.id == task_id)
        ).one()


def _fenced(conn: Connection, claim: Claim, **values: Any) -> None:
    """Update the claimed task only while this claim still holds it; raise otherwise."""
    result = conn.execute(
        update(TASKS)
        .where(TASKS.c.id == claim.task_id, TASKS.c.lease_token == claim.token, TASKS.c.status == "processing")
        .values(**values)
    )
    if result.rowcount == 1:
        return
    fence_lost(conn, claim)


def fence_lost(conn: Connection, claim: Claim) -> NoReturn:
    """Raise why a fenced write matched nothing: the task was cancelled, or another claim holds it."""
    status = conn.execute(select(TASKS.c.status).where(TASKS.c.id == claim.task_id)).scalar_one_or_none()
    if status == "cancelled":
        raise TaskCancelled(f"task {claim.task_id} was cancelled")
    raise LeaseLost(f"task {claim.task_id} is no longer held by this worker (status {status})")


def save_progress(
    engine: Engine, claim: Claim, *, fetch_state: dict[str, Any], chunks: int, lease_s: float
) -> None:
    """Persist the cursor (and the staged part list) after a staged chunk and extend the lease.

    Raises:
        TaskCancelled: the job was cancelled; stop here.
        LeaseLost: another worker took the task over.
    """
    with engine.begin() as conn:
        now = db_now(conn)
        _fenced(conn, claim, fetch_state=fetch_state, chunks=chunks, updated_at=now,
                lease_until=db_now(conn, lease_s))


def renew_lease(engine: Engine, claim: Claim, *, lease_s: float) -> None:
    """Extend the lease under the fence (a heartbeat during a long merge or upload).

    Raises:
        TaskCancelled / LeaseLost: as ``save_progress``.
    """
    with engine.begin() as conn:
        _fenced(conn, claim, lease_until=db_now(conn, lease_s))


def hand_off(engine: Engine, claim: Claim, *, note: str, fetch_state: dict[str, Any] | None = None) -> None:
    """Release a task that ran out of time budget so a continuation message can resume it.

    The next claim counts ``attempts + 1``; a continuation is not a new attempt, so it is
    taken back here. ``fetch_state``, if given, replaces the saved state (an outage notes when
    it began there).
    """
    values: dict[str, Any] = {} if fetch_state is None else {"fetch_state": fetch_state}
    with engine.begin() as conn:
        _fenced(
            conn, claim, status="pending", lease_until=None, lease_token=None,
            attempts=TASKS.c.attempts - 1, updated_at=db_now(conn), **values,
        )
        log(conn, claim.job_id, claim.task_id, "info", note)


def record_attempt_failure(
    engine: Engine, claim: Claim, error: str, *, final: bool, restart: bool = False, code: str = "internal"
) -> bool:
    """Log a failed attempt; release the task for a retry, or fail it for good.

    ``restart`` drops the saved cursor and part list, so the next attempt starts the partition
    over (the partition changed under this lineage). ``code`` is the kind of failure
    (``pipeline.error_codes``), stored beside the message. Returns whether this call finished the job.
    """
    error = clean_text(error)
    with engine.begin() as conn:
        now = db_now(conn)
        log(conn, claim.job_id, claim.task_id, "error", f"attempt {claim.attempts} failed: {error}",
            {"attempt": claim.attempts, "final": final, "code": code})
        if not final:
            extra: dict[str, Any] = {"fetch_state": None, "chunks": 0} if restart else {}
            _fenced(conn, claim, status="pending", lease_until=None, lease_token=None,
                    error_message=error, error_code=code, updated_at=now, **extra)
            return False
        _fenced(conn, claim, status="failed", lease_until=None, lease_token=None,
                error_message=error, error_code=code, updated_at=now, completed_at=now)
        return bump_job(conn, claim.job_id, failed=1, now=utcnow())


def complete_task(conn: Connection, claim: Claim, *, record_count: int, chunks: int) -> bool:
    """Mark the claimed task completed and count it on its job (inside the publish transaction).

    Returns whether this finished the job.
    """
    now = utcnow()
    _fenced(conn, claim, status="completed", lease_until=None, lease_token=None, record_count=record_count,
            chunks=chunks, error_message=None, error_code=None, updated_at=now, completed_at=now)
    return bump_job(conn, claim.job_id, completed=1, records=record_count, now=now)


def complete_task_guarded(
    conn: Connection, claim: Claim, guard: CTE, *, record_count: int, chunks: int
) -> bool | None:
    """``complete_task`` in ONE statement with ``guard``, a data-modifying CTE of the caller
    (the unchanged publish's ``synced_at`` update): the task is completed under its fence and
    counted on its job only if ``guard`` returned a row.

    Returns ``None`` when nothing matched (the guard, or the fence: the caller rolls back and
    takes the general path, which names the reason), else whether this finished the job.
    """
    now = utcnow()
    done = (
        update(TASKS)
        .where(TASKS.c.id == claim.task_id, TASKS.c.lease_token == claim.token, TASKS.c.status == "processing",
               exists(select(literal(1)).select_from(guard)))
        .values(status="completed", lease_until=None, lease_token=None, record_count=record_count, chunks=chunks,
                error_message=None, updated_at=now, completed_at=now)
        .returning(TASKS.c.job_id)
        .cte("done")
    )
    counted = (
        update(JOBS).where(JOBS.c.id == select(done.c.job_id).scalar_subquery())
        .values(completed_tasks=JOBS.c.completed_tasks + 1,
                processed_records=JOBS.c.processed_records + record_count)
        .returning(JOBS.c.total_tasks, JOBS.c.completed_tasks, JOBS.c.failed_tasks, JOBS.c.cancelled_tasks,
                   JOBS.c.status)
        .cte("counted")
    )
    row = conn.execute(select(counted).add_cte(guard, done)).one_or_none()
    if row is None:
        return None
    return _finish_if_done(conn, claim.job_id, row, now)


def bump_job(
    conn: Connection, job_id: uuid.UUID, *, completed: int = 0, failed: int = 0, cancelled: int = 0,
    records: int = 0, now: datetime,
) -> bool:
    """Add to a job's counters; the update that accounts for its last task finishes the job.

    The row lock taken by the UPDATE serialises concurrent finishers, so exactly one of them
    sees the final counts. Returns whether this call finished the job.
    """
    row = conn.execute(
        update(JOBS).where(JOBS.c.id == job_id)
        .values(
            completed_tasks=JOBS.c.completed_tasks + completed,
            failed_tasks=JOBS.c.failed_tasks + failed,
            cancelled_tasks=JOBS.c.cancelled_tasks + cancelled,
            processed_records=JOBS.c.processed_records + records,
        )
        .returning(JOBS.c.total_tasks, JOBS.c.completed_tasks, JOBS.c.failed_tasks, JOBS.c.cancelled_tasks,
                   JOBS.c.status)
    ).one()
    return _finish_if_done(conn, job_id, row, now)


def _finish_if_done(conn: Connection, job_id: uuid.UUID, row: Any, now: datetime) -> bool:
    """Finish the job if ``row`` (its counters as just updated) accounts for its last task."""
    done = row.completed_tasks + row.failed_tasks + row.cancelled_tasks
    if done < row.total_tasks or row.status in FINISHED:
        return False
    if row.failed_tasks:
        status, error = "failed", f"{row.failed_tasks} of {row.total_tasks} tasks failed"
    elif row.cancelled_tasks:
        status, error = "cancelled", None
    else:
        status, error = "completed", None
    conn.execute(
        update(JOBS).where(JOBS.c.id == job_id)
        .values(status=status, completed_at=now, error_message=error,
                started_at=case((JOBS.c.started_at.is_(None), now), else_=JOBS.c.started_at))
    )
    return True


def log(
    conn: Connection, job_id: uuid.UUID, task_id: int | None, level: str, message: str,
    data: dict[str, Any] | None = None,
) -> None:
    conn.execute(insert(JOB_LOG).values(
        job_id=job_id, task_id=task_id, level=level, message=clean_text(message, 4000), data=data,
        created_at=utcnow(),
    ))
