"""Running one task: claim → fetch chunks (staged, cursor saved) → transform → publish.

Each message runs for at most ``TASK_TIME_BUDGET_S`` (invariant 4): a longer fetch saves its
cursor, hands the task off and asks for a continuation message. A crash loses at most the
chunk in flight (invariant 3): the next claim resumes from the saved cursor, and staged
parts are re-read and deduplicated by primary key when the document is assembled.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from connectors import registry
from connectors.base import Connector, FetchRequest, RateLimiter, Record, ResourceSpec, resource_spec
from connectors.transforms import get_transform, sort_key
from pipeline import metrics
from pipeline.assembly import SortedRuns, read_ndjson, render_document, write_ndjson
from pipeline.datasets import current_version, publish, records_key, remove_staging, stage_chunk, staged_part
from pipeline.error_codes import error_code
from pipeline.errors import FailureKind, LeaseLost, PipelineError, TaskCancelled, classify
from pipeline.jobs import Claim, claim_task, hand_off, record_attempt_failure, save_progress
from pipeline.models import CURSORS
from pipeline.runtime import Runtime

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    SKIPPED = "skipped"          # not claimable: finished, cancelled, or leased by a live worker
    COMPLETED = "completed"
    CONTINUE = "continue"        # out of budget; a continuation message must be sent
    FAILED = "failed"            # failed for good (non-retryable error or attempts exhausted)
    CANCELLED = "cancelled"
    LEASE_LOST = "lease_lost"


class RetryTask(PipelineError):
    """Raised to the broker so that its retry middleware re-sends the message with backoff."""


def is_retryable(exc: BaseException) -> bool:
    """Another attempt may succeed (the failure is not permanent)."""
    return classify(exc) is not FailureKind.PERMANENT


def is_outage(exc: BaseException) -> bool:
    """A service we depend on is unreachable (blob storage, the database): not the task's fault.

    Such a failure costs the task no attempt, and the broker keeps retrying it (with capped
    backoff) for as long as the outage lasts. A missing or corrupt object is not an outage.
    """
    return classify(exc) is FailureKind.OUTAGE or isinstance(exc, OperationalError | InterfaceError)


def describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, PipelineError):
        text = f"{type(exc).__name__}: {text}"
    return text[:2000]


def run_task(
    rt: Runtime,
    task_id: int,
    *,
    limiter: RateLimiter | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Outcome:
    """Run (a budget's worth of) one task. The one call the ``sync_partition`` actor makes.

    ``should_stop`` is checked at every chunk boundary: when it answers true (the worker is
    shutting down) the cursor is saved and the task handed off, as when the budget is spent.

    Raises:
        RetryTask: the attempt failed and another is allowed; the broker retries with backoff.
    """
    settings = rt.settings
    claim = claim_task(rt.engine, task_id, lease_s=settings.lease_seconds)
    if claim is None:
        return Outcome.SKIPPED
    started = time.monotonic()
    deadline = started + settings.task_time_budget_s
    try:
        connector = registry.build(claim.connector, claim.connector_config, limiter=limiter,
                                   on_response=metrics.upstream_counter(claim.connector))
        try:
            outcome = _run(rt, claim, connector, deadline, should_stop or _never)
            metrics.task_run(claim.resource, outcome.value, started)
            return outcome
        finally:
            connector.close()
    except TaskCancelled:
        logger.info("task %s cancelled at a chunk boundary", task_id)
        metrics.task_run(claim.resource, Outcome.CANCELLED.value, started)
        return Outcome.CANCELLED
    except LeaseLost as exc:
        logger.warning("%s", exc)
        return Outcome.LEASE_LOST
    except SQLAlchemyError:
        # The database is unreachable: nothing can be recorded. The broker retries the message;
        # if it gives up, the sweeper re-sends the task once its lease expires.
        raise
    except Exception as exc:
        message = describe(exc)
        if is_outage(exc):
            # Blob storage is down: release the task without spending an attempt and let the
            # broker retry; a 30 s outage must not fail every task that reached it.
            logger.warning("task %s: blob storage unavailable, will retry: %s", task_id, message)
            try:
                hand_off(rt.engine, claim, note=f"blob storage unavailable, will retry: {message}")
            except TaskCancelled:
                return Outcome.CANCELLED
            except LeaseLost:
                return Outcome.LEASE_LOST
            raise RetryTask(message) from exc
        final = not is_retryable(exc) or claim.attempts >= settings.max_attempts
        logger.warning("task %s attempt %s failed (%s): %s", task_id, claim.attempts,
                       "final" if final else "will retry", message)
        try:
            record_attempt_failure(rt.engine, claim, message, final=final, code=error_code(exc))
        except TaskCancelled:
            return Outcome.CANCELLED
        except LeaseLost:
            return Outcome.LEASE_LOST
        metrics.task_run(claim.resource, Outcome.FAILED.value if final else "retry", started)
        if final:
            return Outcome.FAILED
        raise RetryTask(message) from exc


def _never() -> bool:
    return False


def _run(rt: Runtime, claim: Claim, connector: Connector, deadline: float, should_stop: Callable[[], bool]) -> Outcome:
    spec = resource_spec(connector, claim.resource)
    transform = get_transform(spec.transform)
    state: dict[str, Any] = dict(claim.fetch_state or {})
    base_key = _incremental_base(rt, claim, spec) if claim.mode == "incremental" else None
    since = state.get("since") if state else (_bookmark(rt, claim) if base_key else None)
    if since is None:
        base_key = None  # no bookmark yet: this incremental sync fetches everything
    chunks = claim.chunks
    fetched = int(state.get("records", 0))
    single: list[Record] | None = None
    while not state.get("done"):
        chunk = connector.fetch(FetchRequest(
            company_id=claim.company_id, external_id=claim.external_id, resource=claim.resource,
            partition=claim.partition, state=state.get("cursor"), since=since, attempt=claim.attempts,
            deadline=deadline,
        ))
        fetched += len(chunk.records)
        if chunks == 0 and chunk.done:
            single = chunk.records  # one chunk: nothing to stage
            break
        stage_chunk(rt.store, claim.task_id, chunks, chunk.records)
        chunks += 1
        state = {"cursor": chunk.state, "records": fetched, "done": chunk.done, "since": since}
        save_progress(rt.engine, claim, fetch_state=state, chunks=chunks, lease_s=rt.settings.lease_seconds)
        if not chunk.done and (time.monotonic() >= deadline or should_stop()):
            reason = "worker stopping" if should_stop() else "time budget spent"
            hand_off(rt.engine, claim, note=f"continuation after chunk {chunks} ({fetched} records so far; {reason})")
            return Outcome.CONTINUE

    runs = SortedRuns(spec.primary_key)
    document = raw = None
    try:
        if base_key is not None:
            runs.add_sorted(partial(_read_records, rt, base_key))
        if single is not None:
            runs.add(single, spill=False)
        else:
            for index in range(chunks):
                runs.add(staged_part(rt.store, claim.task_id, index))
        bookmark = _Bookmark(spec.incremental_field)
        document = render_document(transform, claim.company_id, claim.resource, claim.partition,
                                   lambda: bookmark.track(runs.merged()))
        if spec.incremental_field:
            raw = write_ndjson(runs.merged())
        publish(rt, claim, document, chunks=max(chunks, 1), raw_records=raw, bookmark=bookmark.value)
    finally:
        runs.close()
        for spooled in (document, raw):
            if spooled is not None:
                spooled.close()
    if chunks:
        remove_staging(rt.store, claim.task_id)
    return Outcome.COMPLETED


class _Bookmark:
    """The largest value of the incremental field among the published records."""

    def __init__(self, field: str | None) -> None:
        self.field = field
        self.best: Any = None

    def track(self, records: Iterable[Record]) -> Iterator[Record]:
        for record in records:
            if self.field is not None:
                value = record.get(self.field)
                if value is not None and (self.best is None or sort_key(value) > sort_key(self.best)):
                    self.best = value
            yield record

    @property
    def value(self) -> str | None:
        return None if self.best is None else str(self.best)


def _read_records(rt: Runtime, key: str) -> Iterator[Record]:
    return read_ndjson(rt.store.open(key))


def _bookmark(rt: Runtime, claim: Claim) -> str | None:
    with rt.engine.connect() as conn:
        return conn.execute(select(CURSORS.c.bookmark).where(
            CURSORS.c.company_id == claim.company_id, CURSORS.c.resource == claim.resource,
            CURSORS.c.partition_key == claim.partition,
        )).scalar_one_or_none()


def _incremental_base(rt: Runtime, claim: Claim, spec: ResourceSpec) -> str | None:
    """The raw records of the current version to merge changes into, if the resource is
    incremental and they exist; otherwise ``None`` (the sync fetches everything)."""
    if not spec.incremental_field:
        return None
    current = current_version(rt, claim.company_id, claim.resource, claim.partition)
    if current is None or rt.store.stat(records_key(current)) is None:
        return None
    return records_key(current)
