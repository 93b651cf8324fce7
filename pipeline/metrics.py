"""Prometheus metrics: the definitions, the helpers that record them, and scrape-time collectors.

Workers and API processes record into prometheus_client's default registry. Several processes
on one host (``pipeline worker --processes N``, ``pipeline serve --workers N``) share their
numbers through prometheus_client's multiprocess mode: the supervising process points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the children start (they inherit it),
and one exposition (``render``) sums the files every process writes there. Without that
variable each process keeps its numbers in memory and exposes its own.

Values that live in the database (the age of the oldest pending task) are computed at scrape
time by ``DatabaseCollector``, so they are right whichever process is scraped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from pipeline.models import SyncJob, SyncTask, utcnow
from storage.cache import ByteCache

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Finished states a worker reaches; "cancelled" is counted where the cancel happens (pipeline.control).
_WORKER_FINAL = {"completed", "failed"}

TASKS_FINISHED = Counter(
    "pipeline_tasks_finished", "Tasks that reached a final state.", ["status", "resource"]
)
TASK_RUN_SECONDS = Histogram(
    "pipeline_task_run_seconds",
    "Wall time of one run of a task (one message): claim to completion, continuation, failure or cancel.",
    ["resource", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900),
)
RECORDS_SYNCED = Counter("pipeline_records_synced", "Records in published documents.", ["resource"])
BYTES_WRITTEN = Counter("pipeline_bytes_written", "Bytes of documents uploaded to the blob store.", ["resource"])
UPLOADS_SKIPPED = Counter(
    "pipeline_uploads_skipped", "Publishes whose checksum equalled the current version (nothing uploaded).",
    ["resource"],
)
UPSTREAM_REQUESTS = Counter(
    "pipeline_upstream_requests", "Responses received from upstream APIs, by status.", ["connector", "status"]
)
MESSAGE_SECONDS = Histogram(
    "pipeline_worker_message_duration_seconds",
    "Time a worker spent on one message, by actor and outcome (ok, retry, error).",
    ["actor", "outcome"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900),
)
HTTP_SECONDS = Histogram(
    "pipeline_http_request_duration_seconds",
    "API latency until the response starts, by route template.",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def task_run(resource: str, outcome: str, started: float) -> None:
    """Record one run of a task that ended with ``outcome`` (an ``execution.Outcome`` value).

    ``started`` is the ``time.monotonic()`` of the claim.
    """
    TASK_RUN_SECONDS.labels(resource=resource, outcome=outcome).observe(time.monotonic() - started)
    if outcome in _WORKER_FINAL:
        TASKS_FINISHED.labels(status=outcome, resource=resource).inc()


def tasks_cancelled(by_resource: Mapping[str, int]) -> None:
    for resource, count in by_resource.items():
        TASKS_FINISHED.labels(status="cancelled", resource=resource).inc(count)


def published(resource: str, *, records: int, size: int, uploaded: bool) -> None:
    """Record a published document (``uploaded`` false: same checksum, nothing written)."""
    RECORDS_SYNCED.labels(resource=resource).inc(records)
    if uploaded:
        BYTES_WRITTEN.labels(resource=resource).inc(size)
    else:
        UPLOADS_SKIPPED.labels(resource=resource).inc()


def upstream_counter(connector: str) -> Callable[[int], None]:
    """A connector's ``on_response`` hook counting every upstream response by status."""

    def count(status: int) -> None:
        UPSTREAM_REQUESTS.labels(connector=connector, status=str(status)).inc()

    return count


def message_done(actor: str, outcome: str, seconds: float) -> None:
    MESSAGE_SECONDS.labels(actor=actor, outcome=outcome).observe(seconds)


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_SECONDS.labels(method=method, route=route, status=str(status)).observe(seconds)


class DatabaseCollector:
    """Work waiting in the database, read at scrape time: pending and processing tasks, the
    age of the oldest pending task, and unfinished jobs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("pipeline_metrics_database_up", "Whether the scrape could read the database.")
        try:
            with self.engine.connect() as conn:
                counts = dict(conn.execute(
                    select(SyncTask.status, func.count())
                    .where(SyncTask.status.in_(("pending", "processing")))
                    .group_by(SyncTask.status)
                ).tuples().all())
                oldest = conn.execute(
                    select(func.min(SyncTask.created_at)).where(SyncTask.status == "pending")
                ).scalar_one_or_none()
                unfinished = conn.execute(
                    select(func.count()).select_from(SyncJob).where(SyncJob.status.in_(("pending", "processing")))
                ).scalar_one()
        except Exception as exc:
            logger.warning("metrics: cannot read the database: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        tasks = GaugeMetricFamily("pipeline_tasks", "Tasks waiting or running, by status.", labels=["status"])
        for status in ("pending", "processing"):
            tasks.add_metric([status], counts.get(status, 0))
        yield tasks
        age = GaugeMetricFamily(
            "pipeline_oldest_pending_task_age_seconds",
            "Seconds since the oldest pending task was created (0 when none is pending).",
        )
        age.add_metric([], 0.0 if oldest is None else max(0.0, (utcnow() - oldest).total_seconds()))
        yield age
        jobs = GaugeMetricFamily("pipeline_unfinished_jobs", "Jobs pending or processing.")
        jobs.add_metric([], unfinished)
        yield jobs


class CacheCollector:
    """Hits, misses and hit ratio of this process's read caches."""

    def __init__(self, caches: Mapping[str, ByteCache]) -> None:
        self.caches = caches

    def collect(self) -> Iterable[Metric]:
        hits = CounterMetricFamily("pipeline_read_cache_hits", "Read cache hits.", labels=["cache"])
        misses = CounterMetricFamily("pipeline_read_cache_misses", "Read cache misses.", labels=["cache"])
        ratio = GaugeMetricFamily(
            "pipeline_read_cache_hit_ratio", "Hits / (hits + misses) since start (0 before any lookup).",
            labels=["cache"],
        )
        size = GaugeMetricFamily("pipeline_read_cache_bytes", "Bytes held by the read cache.", labels=["cache"])
        for name, cache in self.caches.items():
            stats = cache.stats()
            lookups = stats.hits + stats.misses
            hits.add_metric([name], stats.hits)
            misses.add_metric([name], stats.misses)
            ratio.add_metric([name], stats.hits / lookups if lookups else 0.0)
            size.add_metric([name], stats.size_bytes)
        yield from (hits, misses, ratio, size)


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes values to ``PROMETHEUS_MULTIPROC_DIR`` (decided at its import)."""
    return values.ValueClass is not values.MutexValue


def render(collectors: Sequence[Collector] = ()) -> bytes:
    """The exposition text: this process's (or, in multiprocess mode, every process's) metrics
    plus ``collectors``, which are evaluated now."""
    extra = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        extra.register(collector)
    if multiprocess_mode():
        multiprocess.MultiProcessCollector(extra)  # type: ignore[no-untyped-call]
        return generate_latest(extra)
    return generate_latest(REGISTRY) + generate_latest(extra)
