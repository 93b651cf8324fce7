"""Broker wiring: RabbitMQ for the real stack, Dramatiq's in-process StubBroker otherwise."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AgeLimit, Retries, ShutdownNotifications, TimeLimit

from actors.shutdown import GracefulStop
from pipeline.execution import RetryTask, is_outage
from pipeline.settings import Settings

HEARTBEAT_S = 60


def amqp_url_with_heartbeat(url: str) -> str:
    """Make sure the connection sends heartbeats (30–60 s; never 0, see dramatiq#321)."""
    parsed = urlparse(url)
    query = dict(parse_qsl(parsed.query))
    query.setdefault("heartbeat", str(HEARTBEAT_S))
    query.setdefault("blocked_connection_timeout", "30")
    return urlunparse(parsed._replace(query=urlencode(query)))


def retry_policy(max_retries: int, *, max_outage_retries: int | None = None) -> Callable[[int, BaseException], bool]:
    """Dramatiq's ``retry_when``: give up after ``max_retries``, or ``max_outage_retries`` while a
    service is down.

    A message that failed because the database or blob storage is unreachable is retried (with
    backoff capped at ``RETRY_MAX_BACKOFF_MS``) for about ``PIPELINE_OUTAGE_RETRY_S``, instead of
    ending in the dead-letter queue after a few seconds of outage. Past that, the sweeper still
    re-sends the task (its lease expires, or it is pending without a message). An attempt whose
    failure the task records (``RetryTask.recorded``) is always retried: the database counts
    those against ``MAX_ATTEMPTS``, while Dramatiq's count also holds the outage's retries, so a
    task that met an outage first would otherwise be dead-lettered on its next ordinary failure.
    """

    def retry(retries: int, exc: BaseException) -> bool:
        cause: BaseException | None = exc
        while cause is not None:
            if is_outage(cause):
                return max_outage_retries is None or retries < max_outage_retries
            if isinstance(cause, RetryTask) and cause.recorded:
                return True
            cause = cause.__cause__
        return retries < max_retries

    return retry


def middleware(settings: Settings) -> list[dramatiq.Middleware]:
    """The broker's middleware. Retry policy lives here, not in actors.

    Backoff stays well under RabbitMQ's consumer_timeout: delayed messages are held
    unacknowledged in worker memory until due (dramatiq#827). The database decides when an
    attempt is the last one; Retries only spaces the attempts.
    """
    return [
        AgeLimit(),
        TimeLimit(time_limit=settings.message_time_limit_ms, interval=1000),
        ShutdownNotifications(),
        GracefulStop(),
        Retries(
            retry_when=retry_policy(
                settings.max_attempts + 2,
                max_outage_retries=int(settings.outage_retry_s * 1000 / max(settings.retry_max_backoff_ms, 1)) + 1,
            ),
            min_backoff=settings.retry_min_backoff_ms,
            max_backoff=settings.retry_max_backoff_ms,
        ),
    ]


def make_broker(settings: Settings) -> dramatiq.Broker:
    """Build the broker named by ``PIPELINE_BROKER_URL`` (unset: in-process) and make it global.

    Dramatiq's actor decorator and its CLI look the broker up globally, so it is set here.
    """
    broker: dramatiq.Broker
    if settings.broker_url:
        broker = RabbitmqBroker(url=amqp_url_with_heartbeat(settings.broker_url), middleware=middleware(settings))
    else:
        broker = StubBroker(middleware=middleware(settings))
        broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    return broker
