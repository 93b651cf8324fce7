"""The actors. Thin: a task id in, one ``pipeline`` call, nothing else."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import dramatiq
import pika
import pika.exceptions
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from sqlalchemy.exc import SQLAlchemyError

from actors.shutdown import graceful_stop
from connectors.rest.ratelimit import make_rate_limiter
from pipeline.execution import Outcome, RetryTask, database_failure, run_task
from pipeline.planning import coordinate_job
from pipeline.runtime import Runtime

# Messages written to the socket at once when planning fans out (see _publish_batch).
PUBLISH_BATCH = 1000
SYNC_PARTITION = "sync_partition"
SYNC_PARTITION_HIGH = "sync_partition_high"
COORDINATE_SYNC = "coordinate_sync"
# Dramatiq's worker takes lower numbers first from the messages it has prefetched.
HIGH_PRIORITY = 0
NORMAL_PRIORITY = 100


@dataclass
class Actors:
    """The declared actors of one broker; implements ``pipeline.dispatch.Dispatcher``."""

    broker: dramatiq.Broker
    normal: dramatiq.Actor[[int], None]
    high: dramatiq.Actor[[int], None]
    coordinator: dramatiq.Actor[[str], None]

    def enqueue(self, task_ids: Sequence[int], *, priority: str = "normal") -> None:
        actor = self.high if priority == "high" else self.normal
        if isinstance(self.broker, RabbitmqBroker) and not self.broker.confirm_delivery:
            for start in range(0, len(task_ids), PUBLISH_BATCH):
                _publish_batch(self.broker, actor, task_ids[start:start + PUBLISH_BATCH])
            return
        for task_id in task_ids:
            actor.send(task_id)

    def coordinate(self, job_id: uuid.UUID, *, priority: str = "normal") -> None:
        self.coordinator.send(str(job_id))

    def backlog(self) -> int | None:
        counts = getattr(self.broker, "get_queue_message_counts", None)
        if counts is None:
            return None
        total = 0
        for actor in (self.normal, self.high, self.coordinator):
            ready, delayed, _dead = counts(actor.queue_name)
            total += ready + delayed
        return total

    @property
    def queues(self) -> list[str]:
        return [self.normal.queue_name, self.high.queue_name, self.coordinator.queue_name]


def _publish_batch(broker: RabbitmqBroker, actor: dramatiq.Actor[[int], None], task_ids: Sequence[int]) -> None:
    """Publish one message per id exactly as ``actor.send`` would, with one socket flush per batch.

    ``actor.send`` goes through pika's ``BlockingChannel.basic_publish``, which flushes the
    socket after every message: publishing took 80 % of planning 80,000 tasks, and planning
    1.4–2.2× as long as a bare COPY plus a bare pika publish (docs/benchmarks.md). Here the
    same Dramatiq messages (same encoder, same properties, enqueue hooks called) are queued on
    the broker's channel for this thread and flushed once per batch with the public
    ``BlockingConnection.process_data_events(0)``, which writes out everything pending. If the
    connection breaks, the batch goes again through ``broker.enqueue``, which reconnects and
    retries: a duplicate costs one failed claim.

    Queuing a message without the flush still takes pika's private ``BlockingChannel._impl``
    (the underlying asynchronous channel, whose ``basic_publish`` only buffers): no public
    batching path exists. ``BlockingChannel.basic_publish`` flushes every message by design, so
    its errors surface at the call; pika's asynchronous adapters publish without flushing, but
    only on a connection driven by their own I/O loop, not on the blocking connection Dramatiq
    owns; AMQP 0-9-1 itself has no multi-message publish.
    """
    messages = [actor.message(task_id) for task_id in task_ids]
    properties = pika.BasicProperties(delivery_mode=2)
    try:
        broker.declare_queue(actor.queue_name, ensure=True)
        channel = broker.channel
        for message in messages:
            broker.emit_before("enqueue", message, None)
            # pika's own basic_publish minus the per-message flush (no confirms on this broker).
            channel._impl.basic_publish(exchange="", routing_key=actor.queue_name, body=message.encode(),
                                        properties=properties)
        broker.connection.process_data_events(time_limit=0)
    except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError):
        del broker.connection
        for message in messages:
            broker.enqueue(message)
        return
    for message in messages:
        broker.emit_after("enqueue", message, None)


def declare_actors(broker: dramatiq.Broker, runtime: Runtime) -> Actors:
    """Declare ``sync_partition`` (scheduled work), its high-priority twin and ``coordinate_sync``.

    People's syncs (API, CLI) go to their own queue and run ahead of the hourly batch. The
    coordinator (planning a submitted job, then sending its tasks) has a queue of its own, so a
    plan never waits behind 80,000 partition messages; Retries re-sends it if it fails.
    """
    queue = runtime.settings.queue_name
    should_stop = graceful_stop(broker).should_stop
    # One limiter per process: on PostgreSQL it spaces requests across every worker on every host.
    limiter = make_rate_limiter(runtime.engine)
    holder: dict[str, dramatiq.Actor[[int], None]] = {}

    def classified(exc: SQLAlchemyError) -> RetryTask:
        # A database error that escaped classification (recording a failure failed too): classify
        # it here, so that a dropped connection is retried as an outage, not dead-lettered.
        failure = database_failure(runtime, exc)
        retry = RetryTask(str(failure), kind=failure.kind)
        retry.__cause__ = exc
        return retry

    def run(task_id: int, actor_name: str) -> None:
        try:
            outcome = run_task(runtime, task_id, limiter=limiter, should_stop=should_stop)
        except RetryTask as exc:
            # dramatiq.Retry: the Retries middleware backs off and re-sends, without an error log.
            raise dramatiq.Retry(str(exc)) from exc
        except SQLAlchemyError as exc:
            retry = classified(exc)
            raise dramatiq.Retry(str(retry)) from retry
        if outcome is Outcome.CONTINUE:
            holder[actor_name].send(task_id)

    def sync_partition(task_id: int) -> None:
        run(task_id, SYNC_PARTITION)

    def sync_partition_high(task_id: int) -> None:
        run(task_id, SYNC_PARTITION_HIGH)

    holder[SYNC_PARTITION] = dramatiq.actor(
        broker=broker, actor_name=SYNC_PARTITION, queue_name=queue, priority=NORMAL_PRIORITY
    )(sync_partition)
    holder[SYNC_PARTITION_HIGH] = dramatiq.actor(
        broker=broker, actor_name=SYNC_PARTITION_HIGH, queue_name=f"{queue}-high", priority=HIGH_PRIORITY
    )(sync_partition_high)
    actors: Actors | None = None

    def coordinate_sync(job_id: str) -> None:
        assert actors is not None
        try:
            coordinate_job(runtime.engine, actors, uuid.UUID(job_id))
        except SQLAlchemyError as exc:
            retry = classified(exc)
            raise dramatiq.Retry(str(retry)) from retry

    coordinator = dramatiq.actor(
        broker=broker, actor_name=COORDINATE_SYNC, queue_name=f"{queue}-coordinator", priority=HIGH_PRIORITY
    )(coordinate_sync)
    actors = Actors(broker=broker, normal=holder[SYNC_PARTITION], high=holder[SYNC_PARTITION_HIGH],
                    coordinator=coordinator)
    return actors
