"""The broker's retry policy (``actors.broker.retry_policy``): what ends in the dead-letter queue."""

from __future__ import annotations

import dramatiq

from actors.broker import retry_policy
from pipeline.errors import FailureKind
from pipeline.execution import RetryTask


def as_dramatiq_retry(failure: RetryTask) -> dramatiq.Retry:
    """What the actor raises for ``failure`` (``actors.tasks``)."""
    try:
        try:
            raise failure
        except RetryTask as exc:
            raise dramatiq.Retry(str(exc)) from exc
    except dramatiq.Retry as retry:
        return retry


def test_an_attempt_the_task_recorded_is_retried_whatever_the_count_an_outage_left() -> None:
    retry = retry_policy(5, max_outage_retries=100)
    recorded = as_dramatiq_retry(RetryTask("HTTP 503", kind=FailureKind.RETRYABLE, recorded=True))
    assert retry(50, recorded), "the database bounds recorded attempts; Dramatiq must not dead-letter first"


def test_outages_are_retried_for_their_own_budget_and_the_rest_for_a_few_retries() -> None:
    retry = retry_policy(5, max_outage_retries=100)
    outage = as_dramatiq_retry(RetryTask("database unavailable", kind=FailureKind.OUTAGE))
    assert retry(99, outage) and not retry(100, outage)
    unrecorded = as_dramatiq_retry(RetryTask("database refused a statement", kind=FailureKind.RETRYABLE))
    assert retry(4, unrecorded) and not retry(5, unrecorded)
    assert retry(4, KeyError("a bug")) and not retry(5, KeyError("a bug"))
