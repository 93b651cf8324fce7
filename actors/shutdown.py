"""Graceful stop: on SIGTERM, tasks checkpoint at their next chunk boundary and hand off."""

from __future__ import annotations

import threading
from typing import Any

import dramatiq


class GracefulStop(dramatiq.Middleware):
    """Raises a flag when the worker starts shutting down.

    Dramatiq lets running messages finish on shutdown; ``pipeline.execution`` checks this flag
    at every chunk boundary and, when it is up, saves its cursor and sends a continuation
    instead of fetching on — so a stop costs at most the chunk in hand, and never waits for a
    whole partition. (Dramatiq's ShutdownNotifications would interrupt mid-chunk instead.)
    """

    def __init__(self) -> None:
        self.stopping = threading.Event()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        self.stopping.clear()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self.stopping.set()

    def should_stop(self) -> bool:
        return self.stopping.is_set()


def graceful_stop(broker: dramatiq.Broker) -> GracefulStop:
    """The broker's GracefulStop middleware (added by ``actors.broker.middleware``)."""
    for middleware in broker.middleware:
        if isinstance(middleware, GracefulStop):
            return middleware
    raise LookupError("the broker has no GracefulStop middleware")
