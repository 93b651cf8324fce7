"""Pytest fixtures yielding started fake upstreams (``pytest_plugins = ["tests.fakes.fixtures"]``).

Each fixture starts a fresh server on a free loopback port for one test and stops it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.upstreams import CloseApi, LinkApi, ScheduleApi, StripeApi


@pytest.fixture
def schedule_api() -> Iterator[ScheduleApi]:
    """The field-service schedule API: 25 jobs per day, 20 users."""
    with ScheduleApi() as api:
        yield api


@pytest.fixture
def stripe_api() -> Iterator[StripeApi]:
    """The Stripe-style customers API: 25 customers."""
    with StripeApi(25) as api:
        yield api


@pytest.fixture
def close_api() -> Iterator[CloseApi]:
    """The Close-style leads API: 25 leads."""
    with CloseApi(25) as api:
        yield api


@pytest.fixture
def link_api() -> Iterator[LinkApi]:
    """The Link-header items API: 25 items."""
    with LinkApi(25) as api:
        yield api
