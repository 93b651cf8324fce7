"""Cleanup: old jobs, staging leftovers, and object versions no dataset references.

Garbage collection never deletes the current version of a dataset: it decides and deletes
under the same per-partition lock the publisher commits under (``pipeline.datasets``), and
the publisher re-checks that its object exists under that lock before committing the pointer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import BigInteger, Engine, any_, delete, literal, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import ColumnElement

from pipeline.datasets import STAGING_PREFIX, document_key_of, lock_partition
from pipeline.models import DATASETS, FINISHED, JOBS, TASKS, utcnow
from storage.base import BlobStore

logger = logging.getLogger(__name__)


# Completed task rows deleted per statement (and transaction) by ``delete_old_task_rows``.
TASK_DELETE_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class CleanupReport:
    jobs_deleted: int = 0
    staging_deleted: int = 0
    versions_deleted: int = 0
    tasks_deleted: int = 0


def delete_old_jobs(engine: Engine, *, retention_days: int, now: datetime | None = None) -> int:
    """Delete finished jobs older than the retention; tasks and logs cascade."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    with engine.begin() as conn:
        result = conn.execute(
            delete(JOBS).where(JOBS.c.status.in_(FINISHED), JOBS.c.created_at < cutoff)
        )
    return int(result.rowcount or 0)


def delete_old_task_rows(engine: Engine, *, retention_days: float, now: datetime | None = None,
                         batch: int = TASK_DELETE_BATCH) -> int:
    """Delete the completed task rows of jobs that finished more than ``retention_days`` ago
    (``PIPELINE_TASK_RETENTION_DAYS``), in transactions of at most ``batch`` rows.

    ``sync_tasks`` grows by a row per partition per sync; at 100,000 companies an hour that is
    19 million rows a day (docs/capacity.md), so completed rows are kept for a shorter time
    than their jobs. The job row and its counters stay (until ``PIPELINE_RETENTION_DAYS``), and
    so do failed and cancelled tasks, whose errors are what someone looks at later; the job log
    lines of a deleted task go with it (ON DELETE CASCADE). Returns how many rows were deleted.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    old = (
        select(TASKS.c.id)
        .join(JOBS, JOBS.c.id == TASKS.c.job_id)
        .where(JOBS.c.status.in_(FINISHED), JOBS.c.completed_at < cutoff, TASKS.c.status == "completed")
        .limit(batch)
    )
    deleted = 0
    while True:
        with engine.begin() as conn:
            count = int(conn.execute(delete(TASKS).where(TASKS.c.id.in_(old.scalar_subquery()))).rowcount or 0)
        deleted += count
        if count < batch:
            return deleted


def id_in(engine: Engine, column: ColumnElement[int], ids: Iterable[int]) -> ColumnElement[bool]:
    """``column`` is one of ``ids``: ``= ANY(:ids)`` on PostgreSQL, one bind parameter however
    many ids (an ``IN`` over 65,535 ids failed, defect 9); ``IN`` on SQLite."""
    values = sorted(set(ids))
    if engine.dialect.name == "postgresql":
        return column == any_(literal(values, ARRAY(BigInteger)))
    return column.in_(values)


def remove_finished_staging(engine: Engine, store: BlobStore) -> int:
    """Delete staging parts of tasks that are finished or no longer exist."""
    task_ids: set[int] = set()
    keys_by_task: dict[int, list[str]] = {}
    for info in store.list(f"{STAGING_PREFIX}/"):
        part = info.key.split("/")
        if len(part) < 3 or not part[1].isdigit():
            continue
        task_id = int(part[1])
        task_ids.add(task_id)
        keys_by_task.setdefault(task_id, []).append(info.key)
    if not task_ids:
        return 0
    with engine.connect() as conn:
        live = set(conn.execute(
            select(TASKS.c.id).where(id_in(engine, TASKS.c.id, task_ids), TASKS.c.status.in_(("pending", "processing")))
        ).scalars())
    removed = 0
    for task_id in sorted(task_ids - live):
        for key in keys_by_task[task_id]:
            store.delete(key)
            removed += 1
    return removed


def collect_garbage(engine: Engine, store: BlobStore, *, grace_s: float, now: datetime | None = None) -> int:
    """Delete object versions (and their ``.records.ndjson`` sidecars) that no dataset references
    and that stopped being current more than the grace period ago.

    A version stopped being current when its partition's pointer moved on, at the latest at the
    partition's ``changed_at``: the grace is measured from there (and from the upload, for a
    version never made current), so readers that just resolved the old pointer keep their
    bytes for the whole grace period (defect 6).
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=grace_s)
    with engine.connect() as conn:
        referenced = set(conn.execute(select(DATASETS.c.storage_key)).scalars())
    deleted = 0
    for info in store.list():
        if info.key.startswith(f"{STAGING_PREFIX}/"):
            continue
        parts = info.key.split("/")
        if len(parts) != 4 or not parts[0].isdigit() or not parts[3].endswith(".json"):
            if not (len(parts) == 4 and parts[0].isdigit() and parts[3].endswith(".records.ndjson")):
                continue  # not ours
        document = document_key_of(info.key) if info.key.endswith(".records.ndjson") else info.key
        if document in referenced or info.last_modified > cutoff:
            continue
        company_id, resource, partition = int(parts[0]), parts[1], parts[2]
        with engine.begin() as conn:
            lock_partition(conn, company_id, resource, partition)
            still_referenced = conn.execute(
                select(DATASETS.c.id).where(DATASETS.c.storage_key == document)
            ).first()
            changed = conn.execute(select(DATASETS.c.changed_at).where(
                DATASETS.c.company_id == company_id, DATASETS.c.resource == resource,
                DATASETS.c.partition_key == partition,
            )).scalar_one_or_none()
            fresh = store.stat(info.key)
            if (still_referenced is None and fresh is not None and fresh.last_modified <= cutoff
                    and (changed is None or changed <= cutoff)):
                store.delete(info.key)
                deleted += 1
    if deleted:
        logger.info("garbage collection deleted %s unreferenced object version(s)", deleted)
    return deleted


def cleanup(engine: Engine, store: BlobStore, *, retention_days: int, grace_s: float,
            task_retention_days: float | None = None) -> CleanupReport:
    """Old jobs (``retention_days``), then completed task rows of older finished jobs
    (``task_retention_days``; ``None``: kept as long as their jobs), staging leftovers and
    unreferenced versions."""
    jobs = delete_old_jobs(engine, retention_days=retention_days)
    tasks = 0
    if task_retention_days is not None and task_retention_days < retention_days:
        tasks = delete_old_task_rows(engine, retention_days=task_retention_days)
    return CleanupReport(
        jobs_deleted=jobs,
        staging_deleted=remove_finished_staging(engine, store),
        versions_deleted=collect_garbage(engine, store, grace_s=grace_s),
        tasks_deleted=tasks,
    )
