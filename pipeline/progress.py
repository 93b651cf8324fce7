"""Job progress: counts, percent and an ETA from the job's own observed task rate."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select

from pipeline.errors import NotFound
from pipeline.models import FINISHED, JOBS, job_status, utcnow


@dataclass(frozen=True, slots=True)
class JobProgress:
    job_id: uuid.UUID
    status: str
    total_tasks: int
    completed_tasks: int
    failed_tasks: int
    cancelled_tasks: int
    processed_records: int
    started_at: datetime | None
    completed_at: datetime | None
    error: str | None

    @property
    def done_tasks(self) -> int:
        return self.completed_tasks + self.failed_tasks + self.cancelled_tasks

    @property
    def percent(self) -> float:
        if self.status == "planning":
            return 0.0
        if self.total_tasks == 0:
            return 100.0
        return round(100.0 * self.done_tasks / self.total_tasks, 1)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def eta_seconds(self, now: datetime | None = None) -> float | None:
        """Remaining tasks at this job's observed rate; ``None`` until a task has finished."""
        if self.finished:
            return 0.0
        if self.started_at is None or self.done_tasks == 0:
            return None
        elapsed = ((now or utcnow()) - self.started_at).total_seconds()
        if elapsed <= 0:
            return None
        rate = self.done_tasks / elapsed
        return round((self.total_tasks - self.done_tasks) / rate, 1)


def job_progress(engine: Engine, job_id: uuid.UUID) -> JobProgress:
    with engine.connect() as conn:
        job = conn.execute(select(JOBS).where(JOBS.c.id == job_id)).one_or_none()
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    return JobProgress(
        job_id=job.id, status=job_status(job.status, job.planned_at), total_tasks=job.total_tasks,
        completed_tasks=job.completed_tasks,
        failed_tasks=job.failed_tasks, cancelled_tasks=job.cancelled_tasks,
        processed_records=job.processed_records, started_at=job.started_at, completed_at=job.completed_at,
        error=job.error_message,
    )


def wait_for_job(
    engine: Engine,
    job_id: uuid.UUID,
    *,
    timeout_s: float | None = None,
    interval_s: float = 0.25,
    on_progress: Callable[[JobProgress], None] | None = None,
) -> JobProgress:
    """Poll a job until it finishes (or ``timeout_s`` passes); report each change."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last: tuple[str, int] | None = None
    while True:
        progress = job_progress(engine, job_id)
        marker = (progress.status, progress.done_tasks)
        if on_progress is not None and marker != last:
            on_progress(progress)
            last = marker
        if progress.finished:
            return progress
        if deadline is not None and time.monotonic() >= deadline:
            return progress
        time.sleep(interval_s)
