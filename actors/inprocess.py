"""An in-process worker for the embedded default (and for tests that run workers in-process)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dramatiq


@contextmanager
def running_worker(broker: dramatiq.Broker, *, threads: int = 4) -> Iterator[dramatiq.Worker]:
    """Run a Dramatiq worker on ``broker`` in this process until the block exits."""
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    # Long tasks: prefetch no more than the threads can run (Dramatiq defaults to 2×).
    worker.queue_prefetch = threads
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
