"""Worker middleware: message timing for Prometheus, and the fleet's metrics endpoint.

Multiprocess choice: ``pipeline worker`` starts several Dramatiq processes on one host. Rather
than one port per process (which Prometheus would have to discover), the supervising process
points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before forking the workers and serves
``/metrics`` on ``PIPELINE_METRICS_PORT`` itself (``serve_fleet_metrics``), summing what every
worker process writes to that directory. Task-level metrics (``pipeline.metrics``: tasks
finished, run time, records, bytes, upstream statuses) are recorded by the pipeline code the
actors call; this middleware adds the per-message view.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy

from pipeline import metrics


class WorkerMetrics(dramatiq.Middleware):
    """Observe how long each message took, by actor and outcome (ok, retry, error)."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        with self._lock:
            self._started[message.message_id] = time.monotonic()

    def after_process_message(
        self, broker: dramatiq.Broker, message: MessageProxy, *, result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        with self._lock:
            started = self._started.pop(message.message_id, None)
        if started is None:
            return
        if exception is None:
            outcome = "ok"
        elif isinstance(exception, dramatiq.Retry):
            outcome = "retry"
        else:
            outcome = "error"
        metrics.message_done(message.actor_name, outcome, time.monotonic() - started)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        with self._lock:
            self._started.pop(message.message_id, None)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if metrics.multiprocess_mode():
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def serve_fleet_metrics(port: int, directory: str, *, host: str = "0.0.0.0") -> None:
    """Serve the summed metrics of every process writing to ``directory`` on ``host:port``.

    Call it in the supervising process, after ``PROMETHEUS_MULTIPROC_DIR`` names ``directory``
    and before anything imported ``prometheus_client`` (it picks its mode at import).

    Raises:
        RuntimeError: prometheus_client was imported before the directory was set.
    """
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    if not metrics.multiprocess_mode():
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)
