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

from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from connectors import registry
from connectors.base import Connector, FetchRequest, RateLimiter, Record, ResourceSpec, resource_spec
from connectors.transforms import get_transform, sort_key
from pipeline import metrics
from pipeline.assembly import SortedRuns, check_records, read_ndjson, render_document, write_ndjson
from pipeline.attempt import Attempt
from pipeline.datasets import (
    current_version,
    legacy_staging_key,
    publish,
    records_key,
    remove_staging,
    staged_part,
)
from pipeline.error_codes import error_code
from pipeline.errors import (
    DatabaseUnavailable,
    FailureKind,
    LeaseLost,
    PipelineError,
    TaskCancelled,
    UpstreamError,
    VersionChanged,
    classify,
)
from pipeline.jobs import Claim, claim_task, clean_text
from pipeline.models import CURSORS
from pipeline.oauth_tokens import token_store
from pipeline.runtime import Runtime
from pipeline.secrets import unseal

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    SKIPPED = "skipped"          # not claimable: finished, cancelled, or leased by a live worker
    COMPLETED = "completed"
    CONTINUE = "continue"        # out of budget; a continuation message must be sent
    FAILED = "failed"            # failed for good (permanent error, attempts or outage time used up)
    CANCELLED = "cancelled"
    LEASE_LOST = "lease_lost"


class RetryTask(PipelineError):
    """Raised to the broker so that its retry middleware re-sends the message with backoff.

    Its kind is the failure's: the broker's retry policy keeps retrying outages (bounded by
    ``PIPELINE_OUTAGE_RETRY_S``) and gives up on the rest after a few retries, unless
    ``recorded``: the failed attempt is counted on the task, so the database bounds the retries
    (``MAX_ATTEMPTS``) and the message must not end in the dead-letter queue first.
    """

    def __init__(self, *args: object, kind: FailureKind | None = None, recorded: bool = False) -> None:
        super().__init__(*args, kind=kind)
        self.recorded = recorded


def is_retryable(exc: BaseException) -> bool:
    """Another attempt may succeed (the failure is not permanent)."""
    return classify(exc) is not FailureKind.PERMANENT


def is_outage(exc: BaseException) -> bool:
    """A service we depend on is unreachable (blob storage, the database): not the task's fault.

    Such a failure costs the task no attempt, and is retried for at most
    ``PIPELINE_OUTAGE_RETRY_S``. A missing or corrupt object is not an outage.
    """
    return classify(exc) is FailureKind.OUTAGE


def describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, PipelineError):
        text = f"{type(exc).__name__}: {text}"
    return clean_text(text)


def database_failure(rt: Runtime, exc: SQLAlchemyError) -> PipelineError:
    """Classify a database error where it surfaced, by asking the database.

    A connection the database dropped (a restart, ``pg_terminate_backend``, a broken link) or
    could not open (no statement ran) is an outage even if the database answers again by now:
    after a disconnect SQLAlchemy discards the pool, so a fresh ``SELECT 1`` reconnects and
    succeeds, yet the statement never ran. Otherwise, if a fresh connection cannot run
    ``SELECT 1`` the database is down: an outage. Otherwise the statement itself was refused (a
    ``DataError`` on text PostgreSQL cannot store, too many bind parameters, a constraint): that
    is this attempt's failure and spends an attempt.
    """
    if isinstance(exc, DBAPIError) and (exc.connection_invalidated or exc.statement is None):
        failure: PipelineError = DatabaseUnavailable(f"database connection lost: {describe(exc)}")
        failure.__cause__ = exc
        return failure
    try:
        with rt.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError:
        failure = DatabaseUnavailable(f"database unavailable: {describe(exc)}")
    else:
        failure = PipelineError(f"database refused a statement: {describe(exc)}")
    failure.__cause__ = exc
    return failure


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

    Every failure is classified (``errors.classify``) and ends in one of: an outage (released
    without spending an attempt, until ``PIPELINE_OUTAGE_RETRY_S`` is used up), a retryable
    failure (an attempt spent; the last one fails the task), a permanent failure (the task
    fails now). Even a ``BaseException`` (the message time limit) is recorded before it goes on.

    Raises:
        RetryTask: the attempt failed and another is allowed; the broker retries with backoff.
    """
    settings = rt.settings
    try:
        claim = claim_task(rt.engine, task_id, lease_s=settings.lease_seconds, max_attempts=settings.max_attempts)
    except SQLAlchemyError as exc:
        # Nothing is claimed, so nothing can be recorded: the broker retries (an outage for as
        # long as PIPELINE_OUTAGE_RETRY_S), then the sweeper re-sends the task.
        failure = database_failure(rt, exc)
        raise RetryTask(str(failure), kind=failure.kind) from exc
    if claim is None:
        return Outcome.SKIPPED
    started = time.monotonic()
    attempt = Attempt.start(rt, claim, should_stop=should_stop)
    try:
        connector = registry.build(claim.connector, unseal(claim.connector_config, rt.secrets), limiter=limiter,
                                   on_response=metrics.upstream_counter(claim.connector),
                                   context=rt.connector_context, tokens=token_store(rt, claim.company_id))
        try:
            outcome = _run(attempt, connector)
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
    except SQLAlchemyError as exc:
        return _failed(attempt, database_failure(rt, exc), started)
    except Exception as exc:
        return _failed(attempt, exc, started)
    except BaseException as exc:
        # The message time limit (a BaseException) or an interpreter exit: spend the attempt
        # while we still can, then let it go on. A kill -9 is caught by the next claim instead.
        try:
            attempt.fail(f"interrupted: {describe(exc)}", final=claim.attempts >= settings.max_attempts,
                         code=error_code(exc))
        except Exception:  # the original interruption matters more
            logger.exception("task %s: could not record the interruption", task_id)
        raise


def _failed(attempt: Attempt, exc: BaseException, started: float) -> Outcome:
    """Record a failed attempt by its kind; return the outcome or raise ``RetryTask``."""
    claim, settings = attempt.claim, attempt.rt.settings
    task_id = claim.task_id
    message = describe(exc)
    kind = classify(exc)
    try:
        if kind is FailureKind.OUTAGE:
            service = "database" if isinstance(exc, DatabaseUnavailable) else "blob storage"
            # The state as this attempt last saved it: a hand-off must not undo a saved chunk.
            state = dict(attempt.saved_state or {})
            since = float(state.get("outage_since") or time.time())
            if time.time() - since <= settings.outage_retry_s:
                # Release the task without spending an attempt: a 30 s outage must not fail every
                # task that reached it.
                logger.warning("task %s: %s unavailable, will retry: %s", task_id, service, message)
                state["outage_since"] = since
                try:
                    attempt.hand_off(f"{service} unavailable, will retry: {message}", fetch_state=state)
                except SQLAlchemyError:
                    # The database is still down: nothing can be recorded. The broker retries the
                    # message; if it gives up, the sweeper re-sends the task once its lease expires.
                    logger.warning("task %s: the database is still unavailable; the lease will expire", task_id)
                raise RetryTask(message, kind=FailureKind.OUTAGE) from exc
            message = (f"{service} unavailable for more than {settings.outage_retry_s:g}s "
                       f"(PIPELINE_OUTAGE_RETRY_S); giving up: {message}")
            final = True
        else:
            final = kind is FailureKind.PERMANENT or claim.attempts >= settings.max_attempts
        logger.warning("task %s attempt %s failed (%s, %s): %s", task_id, claim.attempts, kind.value,
                       "final" if final else "will retry", message)
        attempt.fail(message, final=final, restart=isinstance(exc, VersionChanged), code=error_code(exc))
    except TaskCancelled:
        return Outcome.CANCELLED
    except LeaseLost:
        return Outcome.LEASE_LOST
    metrics.task_run(claim.resource, Outcome.FAILED.value if final else "retry", started)
    if final:
        return Outcome.FAILED
    raise RetryTask(message, kind=kind, recorded=True) from exc


def _run(attempt: Attempt, connector: Connector) -> Outcome:
    rt, claim = attempt.rt, attempt.claim
    spec = resource_spec(connector, claim.resource)
    get_transform(spec.transform)  # an unknown transform fails before anything is fetched
    state: dict[str, Any] = dict(claim.fetch_state or {})
    state.pop("outage_since", None)
    # The lineage's base version (compare-and-swap at publish) and part list (defects 1, 7).
    if "base" not in state and claim.chunks == 0:
        state["base"] = claim.base_checksum
    # A task staged before part lists existed resumes with the keys it used then.
    parts: list[str] = list(state.get("parts", [legacy_staging_key(claim.task_id, i) for i in range(claim.chunks)]))
    base_key = _incremental_base(rt, claim, spec) if claim.mode == "incremental" else None
    since = state.get("since") if "since" in state else (_bookmark(rt, claim) if base_key else None)
    if since is None:
        base_key = None  # no bookmark yet: this incremental sync fetches everything
    chunks = claim.chunks
    fetched = int(state.get("records", 0))
    single: list[Record] | None = None
    while not state.get("done"):
        chunk = connector.fetch(FetchRequest(
            company_id=claim.company_id, external_id=claim.external_id, resource=claim.resource,
            partition=claim.partition, state=state.get("cursor"), since=since, attempt=claim.attempts,
            deadline=attempt.deadline, lease_deadline=attempt.lease_deadline(),
        ))
        check_records(chunk.records, spec.primary_key, first=fetched)
        fetched += len(chunk.records)
        if chunks == 0 and chunk.done:
            single = chunk.records  # one chunk: nothing to stage
            break
        parts.append(attempt.stage(chunks, chunk.records))
        chunks += 1
        state = {**state, "cursor": _storable(chunk.state, "cursor"), "records": fetched, "done": chunk.done,
                 "since": since, "parts": parts}
        attempt.save(state, chunks)
        if not chunk.done and (attempt.out_of_time() or attempt.should_stop()):
            reason = "worker stopping" if attempt.should_stop() else "time budget spent"
            attempt.hand_off(f"continuation after chunk {chunks} ({fetched} records so far; {reason})")
            return Outcome.CONTINUE

    finish(attempt, spec, state, chunks, single=single, base_key=base_key)
    return Outcome.COMPLETED


def finish(
    attempt: Attempt, spec: ResourceSpec, state: dict[str, Any], chunks: int, *,
    single: list[Record] | None = None, base_key: str | None = None,
) -> None:
    """Assemble the lineage's document from the parts it recorded (or the one chunk ``single``)
    and publish it, compare-and-swapping on the lineage's base version; then drop its staging.

    Raises:
        LeaseLost / TaskCancelled / VersionChanged: nothing was published.
    """
    rt, claim = attempt.rt, attempt.claim
    transform = get_transform(spec.transform)
    parts: list[str] = list(state.get("parts", [legacy_staging_key(claim.task_id, i) for i in range(chunks)]))
    runs = SortedRuns(spec.primary_key)
    document = raw = None
    with attempt.keeping_lease():
        try:
            if base_key is not None:
                runs.add_sorted(partial(_read_records, rt, base_key))
            if single is not None:
                runs.add(single, spill=False)
            else:
                if len(parts) != chunks:
                    raise PipelineError(f"task {claim.task_id}: {chunks} chunks saved but {len(parts)} parts recorded",
                                        kind=FailureKind.RETRYABLE)
                for key in parts:
                    runs.add(attempt.beating(staged_part(rt.store, key)))
            bookmark = _Bookmark(spec.incremental_field)
            document = render_document(transform, claim.company_id, claim.resource, claim.partition,
                                       lambda: bookmark.track(attempt.beating(runs.merged())))
            if spec.incremental_field:
                raw = write_ndjson(attempt.beating(runs.merged()))
            publish(rt, claim, document, chunks=max(chunks, 1), raw_records=raw,
                    bookmark=_storable(bookmark.value, "bookmark"), expected_checksum=state.get("base"),
                    check_version="base" in state, reader=attempt.reader)
        finally:
            runs.close()
            for spooled in (document, raw):
                if spooled is not None:
                    spooled.close()
    if chunks:
        remove_staging(rt.store, claim.task_id)


def _storable(value: Any, what: str) -> Any:
    """``value`` if PostgreSQL can store it (no NUL, no lone surrogate in any string).

    Raises:
        UpstreamError: permanent, naming what holds the bad text (defect 3).
    """
    def bad(item: Any) -> bool:
        if isinstance(item, str):
            return "\x00" in item or (not item.isprintable() and _has_surrogate(item))
        if isinstance(item, dict):
            return any(bad(k) or bad(v) for k, v in item.items())
        if isinstance(item, list):
            return any(bad(v) for v in item)
        return False

    if bad(value):
        raise UpstreamError(f"the upstream's {what} contains a NUL character or a lone surrogate, "
                            f"which cannot be stored: {clean_text(repr(value), 200)}")
    return value


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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
