"""Immediate mode: a small sync run in the request that asked for it, answered with its result.

The job is submitted exactly as a queued one (``pipeline.control.submit_job``, under the same
cap), planned by the coordinator's own ``pipeline.planning.coordinate_job``, and its tasks run
through the same ``pipeline.execution.run_task`` a worker calls: the same claim, lease fencing,
staging and publish transaction, so every invariant of the queued path holds. Only who calls
them differs: the request's thread instead of the coordinator and a Dramatiq worker. A retryable
failure is retried here after the configured backoff.

The request works for at most ``PIPELINE_IMMEDIATE_TIMEOUT_S``. Whatever is unfinished by then
(a task handed off at its chunk boundary, one waiting for a retry, one not started) is sent to
the fleet with ordinary messages, so the job finishes there. If the process dies meanwhile, the
sweeper re-sends the tasks once their lease (or ``PENDING_GRACE_S``) has passed, as for any
lost message.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete

from connectors.base import RateLimiter
from pipeline.control import submit_job
from pipeline.dispatch import Dispatcher
from pipeline.errors import RequestConflict
from pipeline.execution import Outcome, RetryTask, run_task
from pipeline.models import JOBS, TASKS
from pipeline.planning import PlannedJob, coordinate_job
from pipeline.runtime import Runtime


class TooLargeForImmediate(RequestConflict):
    """The scope has more tasks than ``PIPELINE_IMMEDIATE_MAX_TASKS``; nothing was started."""


@dataclass(frozen=True, slots=True)
class ImmediateResult:
    job_id: uuid.UUID
    resources: list[str]
    total_tasks: int
    finished: bool
    """Whether the job ran to its end in the request (else the rest went to the fleet)."""


def submit_immediate(
    rt: Runtime,
    dispatcher: Dispatcher | None,
    *,
    trigger: str,
    limiter: RateLimiter | None = None,
    mode: str = "full",
    company_ids: Sequence[int] | None = None,
    resources: Sequence[str] | None = None,
    partitions: Sequence[str] | None = None,
) -> ImmediateResult:
    """Plan a job and run its tasks in this thread, for at most ``immediate_timeout_s``.

    Raises:
        TooLargeForImmediate: more tasks than ``immediate_max_tasks`` (the planned job is
            discarded before any message is sent, so nothing runs).
        TooManyJobs / NotFound / ConfigError: as ``pipeline.control.submit_job``.
    """
    settings = rt.settings
    submitted = submit_job(
        rt.engine, None, trigger=trigger, max_unfinished=settings.max_unfinished_jobs, mode=mode,
        company_ids=company_ids, resources=resources, partitions=partitions, priority="high",
    )
    planned = coordinate_job(rt.engine, None, submitted.job_id)
    if planned is None:  # planning failed the job (the scope no longer plans): answer it as it is
        return ImmediateResult(submitted.job_id, submitted.resources, 0, finished=True)
    if planned.total_tasks > settings.immediate_max_tasks:
        _discard(rt, planned.job_id)
        raise TooLargeForImmediate(
            f"immediate: the scope has {planned.total_tasks} tasks, more than PIPELINE_IMMEDIATE_MAX_TASKS "
            f"({settings.immediate_max_tasks}); narrow it or leave 'immediate' out to queue the job"
        )
    finished = run_in_request(rt, dispatcher, planned, limiter=limiter, timeout_s=settings.immediate_timeout_s)
    return ImmediateResult(planned.job_id, planned.resources, planned.total_tasks, finished=finished)


def _discard(rt: Runtime, job_id: uuid.UUID) -> None:
    # No message was sent for its tasks: deleting the job is invisible to every worker.
    with rt.engine.begin() as conn:
        conn.execute(delete(TASKS).where(TASKS.c.job_id == job_id))
        conn.execute(delete(JOBS).where(JOBS.c.id == job_id))


def run_in_request(
    rt: Runtime,
    dispatcher: Dispatcher | None,
    planned: PlannedJob,
    *,
    limiter: RateLimiter | None,
    timeout_s: float,
) -> bool:
    """Run ``planned``'s tasks one after another with ``run_task`` until done or ``timeout_s``.

    Returns whether every task reached its end here; the others are enqueued on ``dispatcher``.
    """
    deadline = time.monotonic() + timeout_s

    def out_of_time() -> bool:
        return time.monotonic() >= deadline

    settings = rt.settings
    remaining = list(planned.task_ids)
    leftover: list[int] = []
    try:
        while remaining:
            task_id = remaining[0]
            if out_of_time():
                break
            retries = 0
            while True:
                try:
                    outcome = run_task(rt, task_id, limiter=limiter, should_stop=out_of_time)
                except RetryTask:
                    retries += 1
                    backoff_s = min(settings.retry_min_backoff_ms * 2 ** (retries - 1),
                                    settings.retry_max_backoff_ms) / 1000
                    if time.monotonic() + backoff_s >= deadline:
                        leftover.append(task_id)
                        break
                    time.sleep(backoff_s)  # the retry backoff the broker would apply
                    continue
                if outcome is Outcome.CONTINUE:
                    if out_of_time():
                        leftover.append(task_id)
                        break
                    continue
                break  # completed, failed, cancelled, or not ours to run
            remaining.pop(0)
    finally:
        # Also when the database fails mid-way: whatever did not end here goes to the fleet.
        leftover.extend(remaining)
        if leftover and dispatcher is not None:
            dispatcher.enqueue(leftover, priority=planned.priority)
    return not leftover
