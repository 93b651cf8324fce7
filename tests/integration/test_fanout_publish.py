"""The batched fan-out: every message of a many-batch enqueue reaches RabbitMQ."""

from __future__ import annotations

from actors.tasks import PUBLISH_BATCH, Actors
from tests.services import wait_for


def test_enqueue_of_several_batches_puts_every_message_on_the_queue(actors: Actors) -> None:
    task_ids = list(range(1, 2 * PUBLISH_BATCH + 501))
    actors.enqueue(task_ids, priority="normal")
    wait_for(lambda: actors.backlog() == len(task_ids), timeout=60,
             what=f"{len(task_ids)} messages on the queue (backlog {actors.backlog()})")
