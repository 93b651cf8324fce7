"""How the domain asks for work to be run, without knowing the broker."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol


class Dispatcher(Protocol):
    """Sends one ``sync_partition(task_id)`` message per task id.

    RabbitMQ only wakes workers: a message that is lost delays its task until the sweeper
    re-sends it; a duplicate costs one failed claim.
    """

    def enqueue(self, task_ids: Sequence[int], *, priority: str = "normal") -> None:
        """Send one message per id on the queue for ``priority`` ("high" or "normal")."""
        ...

    def coordinate(self, job_id: uuid.UUID, *, priority: str = "normal") -> None:
        """Send one ``coordinate_sync(job_id)`` message: a worker plans the job's tasks and sends them."""
        ...

    def backlog(self) -> int | None:
        """Messages waiting on the queues, or ``None`` when the broker cannot tell."""
        ...
