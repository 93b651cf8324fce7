"""Live job events: the feed behind ``GET /sync/jobs/{id}/events`` and ``pipeline sync --wait``.

On PostgreSQL, triggers (migrations 0002, 0004) ``pg_notify('job_events', json)`` on every task
transition or chunk step and on every change of a job's status or counters, one notification per
transaction and task: a job notification carries, under ``task``, the task transition committed
with it. One process holds
ONE listening connection (``PostgresJobFeed``) and fans notifications out to its subscribers
through asyncio queues, so a thousand watchers cost no more database work than one. The SQLite
embedded mode has no NOTIFY: ``PollingJobFeed`` re-reads the job instead.

A stream starts with a snapshot of the job. On PostgreSQL the snapshot also records which
transactions it saw (``pg_current_snapshot()``), and every notification carries its writer's
transaction id, so notifications the snapshot already reflects are skipped and the rest apply
in commit order. When a subscriber may have missed notifications (the listening connection
dropped, or it fell too far behind) it re-reads the job and reports what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson
import psycopg
from sqlalchemy import Engine, text

from pipeline.control import (
    JobDetail,
    JobSummary,
    TaskView,
    job_error,
    load_job_detail,
    progress_view,
    task_error,
)
from pipeline.errors import PipelineError
from pipeline.models import FINISHED
from pipeline.progress import JobProgress, wait_for_job

logger = logging.getLogger(__name__)

CHANNEL = "job_events"


class FeedUnavailable(PipelineError):
    """The event feed cannot listen right now (the database is unreachable)."""


# --- notifications and snapshots ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notification:
    """One ``job_events`` payload: ``kind`` is "task" or "job"."""

    kind: str
    job_id: uuid.UUID
    xid: int | None
    data: dict[str, Any]


class Resync:
    """Marker: the subscriber may have missed notifications and must re-read the job."""


RESYNC = Resync()
Item = Notification | Resync


def parse_notification(payload: str) -> Notification | None:
    try:
        data = orjson.loads(payload)
        return Notification(kind=str(data["kind"]), job_id=uuid.UUID(str(data["job_id"])),
                            xid=int(data["xid"]) if data.get("xid") is not None else None, data=data)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        logger.warning("ignoring a malformed %s notification: %.200s", CHANNEL, payload)
        return None


@dataclass(frozen=True, slots=True)
class TxSnapshot:
    """A PostgreSQL snapshot (``xmin:xmax:xip,...``): which transactions' writes it shows."""

    xmin: int
    xmax: int
    in_progress: frozenset[int]

    @classmethod
    def parse(cls, value: str) -> TxSnapshot:
        xmin, xmax, xip = value.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def shows(self, xid: int) -> bool:
        """Whether a committed transaction ``xid`` is visible in this snapshot."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.in_progress)


def read_snapshot(engine: Engine, job_id: uuid.UUID, *, task_limit: int) -> tuple[JobDetail, TxSnapshot | None]:
    """The job's detail, consistent with the returned transaction snapshot (PostgreSQL).

    Raises:
        NotFound: no such job.
    """
    with engine.connect() as conn:
        if conn.dialect.name != "postgresql":
            return load_job_detail(conn, job_id, task_limit=task_limit), None
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            snapshot = TxSnapshot.parse(conn.execute(text("SELECT pg_current_snapshot()::text")).scalar_one())
            return load_job_detail(conn, job_id, task_limit=task_limit), snapshot


def progress_from_notification(note: Notification) -> JobProgress:
    data = note.data

    def when(key: str) -> datetime | None:
        value = data.get(key)
        return datetime.fromisoformat(value) if isinstance(value, str) else None

    return JobProgress(
        job_id=note.job_id, status=data["status"], total_tasks=data["total_tasks"],
        completed_tasks=data["completed_tasks"], failed_tasks=data["failed_tasks"],
        cancelled_tasks=data["cancelled_tasks"], processed_records=data["processed_records"],
        started_at=when("started_at"), completed_at=when("completed_at"), error=data.get("error"),
    )


def task_from_notification(note: Notification, data: dict[str, Any] | None = None) -> TaskView:
    """The task of a task notification, or ``data``: the task a job notification carries."""
    data = note.data if data is None else data
    return TaskView(
        id=data["task_id"], company_id=data["company_id"], resource=data["resource"],
        partition=data["partition"], status=data["status"], attempts=data["attempts"],
        record_count=data["record_count"], chunks=data["chunks"],
        error=task_error(data["status"], data.get("error"), data.get("error_code")),
    )


# --- feeds --------------------------------------------------------------------------------------


@dataclass(eq=False)
class Subscription:
    """One watcher's queue of notifications for one job."""

    job_id: uuid.UUID
    maxsize: int = 10_000
    queue: asyncio.Queue[Item] = field(init=False)
    _behind: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.maxsize)

    def deliver(self, item: Item) -> None:
        """Queue ``item`` (on the event loop); a full queue turns into one resync."""
        if self._behind:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self._behind = True

    async def next(self, timeout: float) -> Item | None:
        """The next item, or ``None`` when ``timeout`` passes without one."""
        if self._behind and self.queue.empty():
            self._behind = False
            return RESYNC
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None


class JobFeed(Protocol):
    """Where a stream gets a job's notifications from."""

    poll_interval_s: float | None
    """Re-read the job this often (a polling feed); ``None`` when notifications are pushed."""

    def subscribe(self, job_id: uuid.UUID) -> contextlib.AbstractAsyncContextManager[Subscription]:
        """Receive the job's notifications until the block exits.

        Raises:
            FeedUnavailable: the feed cannot listen (entering the block).
        """
        ...

    async def aclose(self) -> None: ...


class PollingJobFeed:
    """No push: subscribers re-read the job every ``poll_interval_s`` (SQLite, the embedded mode)."""

    def __init__(self, poll_interval_s: float = 0.5) -> None:
        self.poll_interval_s: float | None = poll_interval_s

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: uuid.UUID) -> AsyncIterator[Subscription]:
        yield Subscription(job_id)

    async def aclose(self) -> None:
        return None


class PostgresJobFeed:
    """One ``LISTEN job_events`` connection for the whole process, fanned out per job.

    Runs on the event loop it is first used on. Reconnects with backoff when the connection
    drops, and tells every subscriber to resync, since notifications sent meanwhile are lost.

    Parameters:
        conninfo: a libpq connection string or ``postgresql://`` URL.
        connect_timeout_s: how long ``subscribe`` waits for the listener to be ready.
    """

    poll_interval_s: float | None = None

    def __init__(self, conninfo: str, *, connect_timeout_s: float = 5.0, max_backoff_s: float = 5.0) -> None:
        self.conninfo = conninfo
        self.connect_timeout_s = connect_timeout_s
        self.max_backoff_s = max_backoff_s
        self._subscribers: dict[uuid.UUID, set[Subscription]] = {}
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="job-events-listener")

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: uuid.UUID) -> AsyncIterator[Subscription]:
        if self._closed:
            raise FeedUnavailable("the job event feed is closed")
        self.start()
        subscription = Subscription(job_id)
        self._subscribers.setdefault(job_id, set()).add(subscription)
        try:
            try:
                await asyncio.wait_for(self._listening.wait(), self.connect_timeout_s)
            except TimeoutError:
                raise FeedUnavailable("cannot listen for job events: the database is unreachable") from None
            yield subscription
        finally:
            watchers = self._subscribers.get(job_id)
            if watchers is not None:
                watchers.discard(subscription)
                if not watchers:
                    del self._subscribers[job_id]

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _dispatch(self, payload: str) -> None:
        note = parse_notification(payload)
        if note is None:
            return
        for subscription in tuple(self._subscribers.get(note.job_id, ())):
            subscription.deliver(note)

    def _resync_all(self) -> None:
        for watchers in self._subscribers.values():
            for subscription in watchers:
                subscription.deliver(RESYNC)

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if backoff > 0.2:  # a reconnect: whatever was sent meanwhile is lost
                        self._resync_all()
                    self._listening.set()
                    backoff = 0.2
                    async for notify in conn.notifies():
                        self._dispatch(notify.payload)
            except asyncio.CancelledError:
                self._listening.clear()
                raise
            except Exception as exc:
                if self._listening.is_set():
                    logger.warning("job event listener lost its connection: %s", exc)
                self._listening.clear()
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)


def conninfo_of(engine: Engine) -> str:
    """A libpq URL for ``engine``'s database (without SQLAlchemy's ``+driver`` suffix)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def make_feed(engine: Engine) -> JobFeed:
    """The feed for ``engine``'s database: LISTEN/NOTIFY on PostgreSQL, polling otherwise."""
    if engine.dialect.name == "postgresql":
        return PostgresJobFeed(conninfo_of(engine))
    return PollingJobFeed()


# --- one job's event stream --------------------------------------------------------------------


Event = tuple[str, dict[str, Any]]
"""``(name, data)``: "snapshot" (the job with its tasks), "task" (one task's new state),
"progress" (the job's status and counts with ETA), "end" (the job's final state, last), or
"keepalive" (nothing happened for a while; data empty)."""


def _task_state(task: TaskView) -> tuple[str, int, int]:
    return task.status, task.chunks, task.attempts


@dataclass
class _Tracker:
    """What the watcher has been told so far, to report only changes."""

    summary: JobSummary
    progress: JobProgress
    tasks: dict[int, tuple[str, int, int]]
    snapshot: TxSnapshot | None

    @classmethod
    def start(cls, detail: JobDetail, snapshot: TxSnapshot | None) -> _Tracker:
        tasks = {t.id: _task_state(t) for t in detail.tasks}
        return cls(_summary(detail), _detail_progress(detail), tasks, snapshot)

    def seen(self, note: Notification) -> bool:
        return self.snapshot is not None and note.xid is not None and self.snapshot.shows(note.xid)

    def task(self, task: TaskView) -> Event | None:
        state = _task_state(task)
        if self.tasks.get(task.id) == state:
            return None
        self.tasks[task.id] = state
        return "task", asdict(task)

    def job(self, progress: JobProgress) -> Event | None:
        if _progress_key(progress) == _progress_key(self.progress):
            return None
        self.progress = progress
        self.summary = JobSummary(
            id=self.summary.id, status=progress.status, mode=self.summary.mode, trigger=self.summary.trigger,
            progress=progress_view(progress), created_at=self.summary.created_at, started_at=progress.started_at,
            completed_at=progress.completed_at, error=job_error(progress.status, progress.error),
        )
        return "progress", self.progress_data()

    def progress_data(self) -> dict[str, Any]:
        return {"status": self.progress.status, **asdict(progress_view(self.progress))}

    def end(self) -> Event:
        return "end", asdict(self.summary)


def _detail_progress(detail: JobDetail) -> JobProgress:
    return JobProgress(
        job_id=detail.id, status=detail.status, total_tasks=detail.progress.total_tasks,
        completed_tasks=detail.progress.completed_tasks, failed_tasks=detail.progress.failed_tasks,
        cancelled_tasks=detail.progress.cancelled_tasks, processed_records=detail.progress.processed_records,
        started_at=detail.started_at, completed_at=detail.completed_at,
        error=detail.error.message if detail.error is not None and detail.error.code == "tasks_failed" else None,
    )


def _summary(detail: JobDetail) -> JobSummary:
    return JobSummary(
        id=detail.id, status=detail.status, mode=detail.mode, trigger=detail.trigger, progress=detail.progress,
        created_at=detail.created_at, started_at=detail.started_at, completed_at=detail.completed_at,
        error=detail.error,
    )


def _progress_key(p: JobProgress) -> tuple[Any, ...]:
    return (p.status, p.total_tasks, p.completed_tasks, p.failed_tasks, p.cancelled_tasks, p.processed_records)


async def job_event_stream(
    engine: Engine,
    feed: JobFeed,
    job_id: uuid.UUID,
    *,
    keepalive_s: float = 15.0,
    task_limit: int = 10_000,
) -> AsyncGenerator[Event, None]:
    """The events of one job, from a snapshot to its final state (see ``Event``).

    The first event is produced before any waiting, so a caller can pull it to find out
    whether the job exists.

    Raises:
        NotFound: no such job (before the first event).
        FeedUnavailable: the feed cannot listen (before the first event).
    """
    async with feed.subscribe(job_id) as subscription:
        load = functools.partial(read_snapshot, engine, job_id, task_limit=task_limit)
        detail, snapshot = await asyncio.to_thread(load)
        tracker = _Tracker.start(detail, snapshot)
        yield "snapshot", asdict(detail)
        idle_since = time.monotonic()
        while tracker.progress.status not in FINISHED:
            wait = feed.poll_interval_s or keepalive_s
            item = await subscription.next(wait)
            if item is None:
                if feed.poll_interval_s is None or time.monotonic() - idle_since >= keepalive_s:
                    idle_since = time.monotonic()
                    yield "keepalive", {}
                if feed.poll_interval_s is None:
                    continue
                item = RESYNC
            events: list[Event | None]
            if isinstance(item, Resync):
                fresh, tracker.snapshot = await asyncio.to_thread(load)
                events = [tracker.task(task) for task in fresh.tasks]
                events.append(tracker.job(_detail_progress(fresh)))
            elif tracker.seen(item):
                continue
            elif item.kind == "task":
                events = [tracker.task(task_from_notification(item))]
            else:
                # A job notification carries the task transition of the same transaction (migration 0004).
                task = item.data.get("task")
                events = [tracker.task(task_from_notification(item, task))] if isinstance(task, dict) else []
                events.append(tracker.job(progress_from_notification(item)))
            for event in events:
                if event is not None:
                    idle_since = time.monotonic()
                    yield event
        yield tracker.end()


# --- blocking follower for the CLI -------------------------------------------------------------


def follow_job(engine: Engine, job_id: uuid.UUID, *, idle_s: float = 1.0) -> Iterator[JobProgress]:
    """Yield the job's progress from the PostgreSQL feed until it finishes (blocking).

    Yields the current progress first, then after every change, and again after ``idle_s``
    without one (so an ETA display keeps moving). Runs its own LISTEN connection.
    """
    with psycopg.connect(conninfo_of(engine), autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        detail, snapshot = read_snapshot(engine, job_id, task_limit=0)
        tracker = _Tracker.start(detail, snapshot)
        yield tracker.progress
        while tracker.progress.status not in FINISHED:
            changed = False
            for notify in conn.notifies(timeout=idle_s):
                note = parse_notification(notify.payload)
                if note is None or note.job_id != job_id or note.kind != "job" or tracker.seen(note):
                    continue
                if tracker.job(progress_from_notification(note)) is not None:
                    changed = True
                    yield tracker.progress
                    if tracker.progress.status in FINISHED:
                        return
            if not changed:
                yield tracker.progress


def wait_for_job_events(
    engine: Engine,
    job_id: uuid.UUID,
    *,
    on_progress: Callable[[JobProgress], None] | None = None,
    timeout_s: float | None = None,
) -> JobProgress:
    """Like ``pipeline.progress.wait_for_job``, but fed by LISTEN/NOTIFY on PostgreSQL (polls on SQLite)."""
    if engine.dialect.name != "postgresql":
        return wait_for_job(engine, job_id, on_progress=on_progress, timeout_s=timeout_s)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last: JobProgress | None = None
    for progress in follow_job(engine, job_id):
        if on_progress is not None:  # also when idle: the ETA moves with time
            on_progress(progress)
        last = progress
        if deadline is not None and time.monotonic() >= deadline:
            break
    assert last is not None  # follow_job always yields the current progress first
    return last
