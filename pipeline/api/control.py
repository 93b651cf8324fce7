"""The control API: start syncs, watch jobs (status with ETA, live events, logs), cancel, retry.

Every endpoint here and in ``pipeline.api.companies`` needs the admin key: header
``X-API-Key`` equal to ``PIPELINE_ADMIN_API_KEY``. Without that setting they answer 503 (the
control API is off), never open.

Planning and enqueueing block (database, RabbitMQ through pika, which is not thread-safe), so
those endpoints are plain ``def``: they run in the threadpool, and Dramatiq's RabbitMQ broker
keeps one connection per thread. The event stream is ``async``: it waits on the process's one
LISTEN connection (``pipeline.events``) and blocks only to read snapshots, in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, TypeAdapter
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse

from connectors.base import RateLimiter
from connectors.jsontypes import integral
from pipeline.api.deps import ApiState, State, api_state
from pipeline.api.errors import ErrorBody, error_response
from pipeline.api.limits import SlotStreamingResponse, StreamsExhausted, StreamSlots, streams_exhausted
from pipeline.control import (
    CancelResult,
    InvalidJobState,
    JobDetail,
    JobSummary,
    LogEntry,
    RetryResult,
    TooManyJobs,
    cancel_job,
    job_detail,
    job_logs,
    list_jobs,
    retry_job,
    submit_job,
)
from pipeline.dispatch import Dispatcher
from pipeline.errors import ConfigError, NotFound
from pipeline.events import Event, FeedUnavailable, JobFeed, job_event_stream, make_feed
from pipeline.immediate import submit_immediate
from pipeline.ratelimit import make_rate_limiter
from pipeline.runtime import Runtime

ADMIN_KEY_SETTING = "PIPELINE_ADMIN_API_KEY"
MAX_ID = 2**53 - 1
"""The largest id the API accepts: every JSON client (JavaScript, a generator working in doubles)
represents it exactly, so the bound in the schema is the bound that is checked."""
JOB_DETAIL = TypeAdapter(JobDetail)
JobStatus = Literal["pending", "processing", "completed", "failed", "cancelled"]  # pipeline.models.STATUSES

# --- per-app state -----------------------------------------------------------------------------


class ControlState:
    """What the control endpoints need beyond ``ApiState``: a dispatcher and the event feed.

    Both are built on first use (an app that only serves reads never connects to RabbitMQ).
    Without ``PIPELINE_BROKER_URL`` (the embedded default) the dispatcher is Dramatiq's
    in-process broker with a worker running in this process, so a sync started over HTTP runs.

    Parameters:
        runtime: the app's runtime.
        dispatcher: use this instead of building one (tests, embedding); not closed here.
        feed: use this event feed instead of building one; not closed here.
    """

    def __init__(self, runtime: Runtime, *, dispatcher: Dispatcher | None = None, feed: JobFeed | None = None) -> None:
        self.runtime = runtime
        self._dispatcher = dispatcher
        self._feed = feed
        self._owned_feed: JobFeed | None = None
        self._limiter: RateLimiter | None = None
        self._lock = threading.Lock()
        self._resources = contextlib.ExitStack()
        self.streams = StreamSlots(runtime.settings.api_max_event_streams)

    def dispatcher(self) -> Dispatcher:
        """The dispatcher, built on the first call (blocking; call it from a worker thread)."""
        with self._lock:
            if self._dispatcher is None:
                from actors.broker import make_broker
                from actors.tasks import declare_actors

                settings = self.runtime.settings
                broker = make_broker(settings)
                self._resources.callback(broker.close)
                actors = declare_actors(broker, self.runtime)
                if not settings.broker_url:
                    from actors.inprocess import running_worker

                    self._resources.enter_context(running_worker(broker, threads=settings.worker_threads))
                self._dispatcher = actors
            return self._dispatcher

    def limiter(self) -> RateLimiter:
        """The upstream rate limiter for syncs run in this process (immediate mode)."""
        with self._lock:
            if self._limiter is None:
                self._limiter = make_rate_limiter(self.runtime.engine)
            return self._limiter

    def feed(self) -> JobFeed:
        """The event feed (call on the event loop): one per app, built on first use."""
        if self._feed is None:
            self._feed = self._owned_feed = make_feed(self.runtime.engine)
        return self._feed

    async def aclose(self) -> None:
        if self._owned_feed is not None:
            await self._owned_feed.aclose()
        # Stopping an in-process worker joins its threads: not on the event loop.
        await asyncio.to_thread(self._resources.close)


def control_state(request: Request) -> ControlState:
    """The app's ``ControlState`` (``app.state.control``), created on first use."""
    app_state = request.app.state
    control: ControlState | None = getattr(app_state, "control", None)
    if control is None:
        control = app_state.control = ControlState(api_state(request).runtime)
    return control


async def get_control(request: Request) -> ControlState:
    return control_state(request)


Control = Annotated[ControlState, Depends(get_control)]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        yield
    finally:
        control: ControlState | None = getattr(app.state, "control", None)
        if control is not None:
            await control.aclose()


# --- admin key ---------------------------------------------------------------------------------

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description=f"The value of {ADMIN_KEY_SETTING}.")


async def require_admin(request: Request, key: Annotated[str | None, Depends(api_key_header)]) -> None:
    """Let the request through only with the admin key.

    Raises:
        HTTPException: 503 when no admin key is configured, 401 when it is missing or wrong.
    """
    expected = api_state(request).runtime.settings.admin_api_key
    if not expected:
        raise HTTPException(503, f"the control API is disabled: {ADMIN_KEY_SETTING} is not set")
    if not key:
        raise HTTPException(401, "missing X-API-Key header", headers={"WWW-Authenticate": "X-API-Key"})
    if not secrets.compare_digest(key.encode(), expected.encode()):
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "X-API-Key"})


ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong X-API-Key"},
    422: {"model": ErrorBody, "description": "Invalid request; the message names the field"},
    503: {"model": ErrorBody, "description": f"{ADMIN_KEY_SETTING} is not set, or the database is unavailable"},
}

router = APIRouter(
    tags=["control"], dependencies=[Depends(require_admin)], responses=ADMIN_RESPONSES, lifespan=lifespan
)

# --- start a sync ------------------------------------------------------------------------------

CompanyId = Annotated[int, Field(ge=1, le=MAX_ID), BeforeValidator(integral)]
# No control characters (pipeline.planning refuses them): said in the schema, so clients know.
_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
ResourceName = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=_PRINTABLE)]
PartitionKey = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=_PRINTABLE)]


class SyncRequest(BaseModel):
    """What to sync; every list narrows the scope, and an omitted one means all."""

    model_config = ConfigDict(extra="forbid", strict=True)

    company_ids: list[CompanyId] | None = Field(default=None, max_length=100_000)
    resources: list[ResourceName] | None = Field(default=None, max_length=1000)
    partitions: list[PartitionKey] | None = Field(default=None, max_length=10_000)
    mode: Literal["full", "incremental"] = "full"
    priority: Literal["high", "normal"] | None = None
    immediate: bool = Field(
        default=False,
        description="Run the sync before answering: 200 with the finished job (at most "
        "PIPELINE_IMMEDIATE_MAX_TASKS tasks in scope, else 409 naming immediate)",
    )


class SyncAccepted(BaseModel):
    """The submitted job: ``planning`` until the coordinator has inserted its tasks (``total_tasks``
    is 0 until then; watch ``status_url`` or ``events_url``). ``resource_types`` are those asked for."""

    job_id: uuid.UUID
    status: str
    total_tasks: int
    resource_types: list[str]
    status_url: str
    events_url: str


SYNC_CONFLICTS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "A company in scope does not exist"},
    409: {
        "model": ErrorBody,
        "description": "A company in scope is disabled or unusable, does not offer a resource in scope,"
        " or has more tasks than `immediate` runs",
    },
    429: {"model": ErrorBody, "description": "A company in scope is at the unfinished-jobs cap"},
}
"""The answers of ``immediate_or_queued`` beyond the body's validation (``POST /sync``, ``POST /v1/sync``)."""


def immediate_or_queued(
    state: ApiState,
    control: ControlState,
    *,
    immediate: bool,
    company_ids: list[int] | None,
    resources: list[str] | None,
    partitions: list[str] | None,
    mode: str,
    accepted: Callable[[uuid.UUID, list[str], str, int], Any],
    finished: Callable[[uuid.UUID], Any],
    priority: str | None = None,
) -> Any:
    """Start a sync the way ``POST /sync`` and ``POST /v1/sync`` both do.

    Queued: 202 with ``accepted(job_id, resources, status, total_tasks)`` (status "planning":
    the coordinator plans the tasks). Immediate: the job is planned and its tasks run in this
    request (``pipeline.immediate``); 200 with ``finished(job_id)`` when they all ended in time,
    else 202 (the rest finishes on the fleet). A company that does not exist answers 404; one that
    cannot be synced now (disabled, unusable config, a resource it does not offer, too many tasks
    for ``immediate``) 409 naming it; the unfinished-jobs cap 429. The body itself was validated
    by its model (422), so a 4xx here is never about its shape.
    """
    settings = state.runtime.settings
    try:
        if immediate:
            result = submit_immediate(
                state.runtime, control.dispatcher(), trigger="api", limiter=control.limiter(), mode=mode,
                company_ids=company_ids, resources=resources, partitions=partitions,
            )
            if result.finished:
                body = JOB_DETAIL.dump_json(finished(result.job_id))  # as the response_model would
                return Response(body, status_code=200, media_type="application/json")
            return accepted(result.job_id, result.resources, "processing", result.total_tasks)
        submitted = submit_job(
            state.runtime.engine, control.dispatcher(), trigger="api", max_unfinished=settings.max_unfinished_jobs,
            mode=mode, company_ids=company_ids, resources=resources, partitions=partitions, priority=priority,
        )
    except TooManyJobs as exc:
        return error_response(429, "too_many_jobs", str(exc))
    except NotFound as exc:
        return error_response(404, "unknown_company", str(exc))
    except ConfigError as exc:
        return error_response(409, "conflict", str(exc))
    return accepted(submitted.job_id, submitted.resources, "planning", 0)


@router.post(
    "/sync",
    status_code=202,
    response_model=SyncAccepted,
    responses={
        200: {"model": JobDetail, "description": "`immediate`: the finished job"},
        **SYNC_CONFLICTS,
    },
    summary="Start a sync: records the job and hands its planning to the coordinator, answers before any task "
            "exists (status planning; total_tasks and the tasks appear once it is planned); `immediate` runs it",
)
def start_sync(body: SyncRequest, state: State, control: Control) -> Any:
    def accepted(job_id: uuid.UUID, resources: list[str], status: str, total_tasks: int) -> SyncAccepted:
        return SyncAccepted(
            job_id=job_id, status=status, total_tasks=total_tasks, resource_types=resources,
            status_url=f"/sync/jobs/{job_id}", events_url=f"/sync/jobs/{job_id}/events",
        )

    return immediate_or_queued(
        state, control, immediate=body.immediate, company_ids=body.company_ids, resources=body.resources,
        partitions=body.partitions, mode=body.mode, priority=body.priority, accepted=accepted,
        finished=lambda job_id: job_detail(state.runtime.engine, job_id=job_id),
    )


# --- watch jobs --------------------------------------------------------------------------------


@router.get("/sync/jobs", response_model=list[JobSummary], summary="Recent jobs, newest first")
def get_jobs(
    state: State,
    status: Annotated[JobStatus | None, Query()] = None,
    company_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> Any:
    return list_jobs(state.runtime.engine, status=status, company_id=company_id, limit=limit)


@router.get(
    "/sync/jobs/{job_id}",
    response_model=JobDetail,
    responses={404: {"model": ErrorBody, "description": "No such job"}},
    summary="A job's status, progress with ETA, and tasks",
)
def get_job(job_id: uuid.UUID, state: State, task_limit: Annotated[int, Query(ge=0, le=100_000)] = 1000) -> Any:
    return job_detail(state.runtime.engine, job_id=job_id, task_limit=task_limit)


@router.get(
    "/sync/jobs/{job_id}/logs",
    response_model=list[LogEntry],
    responses={404: {"model": ErrorBody, "description": "No such job"}},
    summary="A job's log: attempt errors, retries, continuations, cancellations",
)
def get_job_logs(
    job_id: uuid.UUID,
    state: State,
    after_id: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    level: Annotated[Literal["debug", "info", "warning", "error"] | None, Query()] = None,
) -> Any:
    return job_logs(state.runtime.engine, job_id=job_id, after_id=after_id, limit=limit, level=level)


def _sse(event_id: int, event: Event) -> bytes:
    name, data = event
    if name == "keepalive":
        return b": keepalive\n\n"
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, name.encode(), orjson.dumps(data))


STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorBody,
        "description": "Too many event streams are open in this process (see Retry-After), or the feed is down",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait"}},
    },
}
"""OpenAPI ``responses`` of the event-stream endpoints (``event_stream_response``)."""


@router.get(
    "/sync/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Server-Sent Events: snapshot, then task / progress events, then end",
        },
        404: {"model": ErrorBody, "description": "No such job"},
        **STREAM_RESPONSES,
    },
    summary="Live events of a job (Server-Sent Events), ending with its final state",
    description=(
        "Events: `snapshot` (the job with its tasks), then `task` (a task's new status or chunk count) "
        "and `progress` (the job's counts and ETA) in commit order, then `end` (the final state), after "
        "which the stream closes: an EventSource client should close on `end` rather than reconnect."
    ),
)
async def get_job_events(job_id: uuid.UUID, state: State, control: Control) -> Response:
    return await event_stream_response(
        job_event_stream(state.runtime.engine, control.feed(), job_id), slots=control.streams
    )




def _nothing() -> None:
    pass


async def event_stream_response(stream: AsyncGenerator[Event, None], *, slots: StreamSlots | None = None) -> Response:
    """Serve ``stream`` as Server-Sent Events; its first event is pulled first, so a missing job
    (``NotFound``) answers 404 and an unavailable feed 503 instead of an empty stream.

    With ``slots``, the stream holds one of this process's ``PIPELINE_API_MAX_EVENT_STREAMS``
    slots until it ends however it ends; none free answers 503 with ``Retry-After``.
    """
    release: Callable[[], None] = _nothing
    if slots is not None:
        try:
            release = slots.acquire()
        except StreamsExhausted as exc:
            await stream.aclose()
            return streams_exhausted(exc)
    try:
        first = await anext(stream)
    except FeedUnavailable as exc:
        await stream.aclose()
        release()
        return error_response(503, "events_unavailable", str(exc))
    except BaseException:
        release()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            yield _sse(1, first)
            number = 1
            async for event in stream:
                number += 1
                yield _sse(number, event)
        finally:
            await stream.aclose()

    return SlotStreamingResponse(
        body(),
        release=release,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# --- cancel and retry --------------------------------------------------------------------------


@router.post(
    "/sync/jobs/{job_id}/cancel",
    response_model=CancelResult,
    responses={
        404: {"model": ErrorBody, "description": "No such job"},
        409: {"model": ErrorBody, "description": "The job has already finished"},
    },
    summary="Cancel a job: pending tasks at once, running ones at their next chunk boundary",
)
def post_cancel(job_id: uuid.UUID, state: State) -> Any:
    try:
        return cancel_job(state.runtime.engine, job_id=job_id, requested_by="api")
    except InvalidJobState as exc:
        return error_response(409, "conflict", str(exc))


@router.post(
    "/sync/jobs/{job_id}/retry",
    status_code=202,
    response_model=RetryResult,
    responses={
        404: {"model": ErrorBody, "description": "No such job"},
        409: {"model": ErrorBody, "description": "The job is still running or has nothing to retry"},
    },
    summary="Retry a finished job's failed and cancelled tasks",
)
def post_retry(job_id: uuid.UUID, state: State, control: Control) -> Any:
    try:
        return retry_job(state.runtime.engine, control.dispatcher(), job_id=job_id, requested_by="api")
    except InvalidJobState as exc:
        return error_response(409, "conflict", str(exc))
