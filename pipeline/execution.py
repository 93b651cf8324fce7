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
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from connectors import registry
from connectors.base import Connector, FetchRequest, RateLimiter, Record, resource_spec
from connectors.transforms import dedupe, get_transform
from pipeline.datasets import publish, read_staged, remove_staging, serialize, stage_chunk
from pipeline.errors import ConfigError, ConnectorError, LeaseLost, PipelineError, TaskCancelled, UpstreamError
from pipeline.jobs import Claim, claim_task, hand_off, record_attempt_failure, save_progress
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
    if isinstance(exc, UpstreamError):
        return exc.retryable
    # A bad config or an unknown resource will not fix itself between attempts.
    return not isinstance(exc, ConfigError | ConnectorError)


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
    deadline = time.monotonic() + settings.task_time_budget_s
    try:
        connector = registry.build(claim.connector, claim.connector_config, limiter=limiter)
        try:
            return _run(rt, claim, connector, deadline, should_stop or _never)
        finally:
            connector.close()
    except TaskCancelled:
        logger.info("task %s cancelled at a chunk boundary", task_id)
        return Outcome.CANCELLED
    except LeaseLost as exc:
        logger.warning("%s", exc)
        return Outcome.LEASE_LOST
    except SQLAlchemyError:
        # The database is unreachable: nothing can be recorded. The broker retries the message;
        # if it gives up, the sweeper re-sends the task once its lease expires.
        raise
    except Exception as exc:
        final = not is_retryable(exc) or claim.attempts >= settings.max_attempts
        message = describe(exc)
        logger.warning("task %s attempt %s failed (%s): %s", task_id, claim.attempts,
                       "final" if final else "will retry", message)
        try:
            record_attempt_failure(rt.engine, claim, message, final=final)
        except TaskCancelled:
            return Outcome.CANCELLED
        except LeaseLost:
            return Outcome.LEASE_LOST
        if final:
            return Outcome.FAILED
        raise RetryTask(message) from exc


def _never() -> bool:
    return False


def _run(rt: Runtime, claim: Claim, connector: Connector, deadline: float, should_stop: Callable[[], bool]) -> Outcome:
    spec = resource_spec(connector, claim.resource)
    state: dict[str, Any] = dict(claim.fetch_state or {})
    chunks = claim.chunks
    fetched = int(state.get("records", 0))
    single: list[Record] | None = None
    while not state.get("done"):
        chunk = connector.fetch(FetchRequest(
            company_id=claim.company_id, external_id=claim.external_id, resource=claim.resource,
            partition=claim.partition, state=state.get("cursor"), attempt=claim.attempts, deadline=deadline,
        ))
        fetched += len(chunk.records)
        if chunks == 0 and chunk.done:
            single = chunk.records  # one chunk: nothing to stage
            break
        stage_chunk(rt.store, claim.task_id, chunks, chunk.records)
        chunks += 1
        state = {"cursor": chunk.state, "records": fetched, "done": chunk.done}
        save_progress(rt.engine, claim, fetch_state=state, chunks=chunks, lease_s=rt.settings.lease_seconds)
        if not chunk.done and (time.monotonic() >= deadline or should_stop()):
            reason = "worker stopping" if should_stop() else "time budget spent"
            hand_off(rt.engine, claim, note=f"continuation after chunk {chunks} ({fetched} records so far; {reason})")
            return Outcome.CONTINUE
    records: Iterable[Record] = single if single is not None else read_staged(rt.store, claim.task_id, chunks)
    rows = dedupe(records, spec.primary_key)
    document = get_transform(spec.transform)(claim.company_id, claim.resource, claim.partition, rows)
    payload = serialize(document)
    publish(rt, claim, payload, record_count=len(rows), chunks=max(chunks, 1))
    if chunks:
        remove_staging(rt.store, claim.task_id)
    return Outcome.COMPLETED
