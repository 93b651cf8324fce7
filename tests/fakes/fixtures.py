"""Pytest fixtures yielding started fake upstreams (``pytest_plugins = ["tests.fakes.fixtures"]``).

Each fixture starts a fresh server on a free loopback port for one test and stops it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes import scripted
from tests.fakes.graphql_api import GraphQLApi
from tests.fakes.oauth2 import OAuth2Provider
from tests.fakes.upstreams import CloseApi, LinkApi, ScheduleApi, StripeApi
from tests.fakes.videos import VideoApi


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


@pytest.fixture
def graphql_api() -> Iterator[GraphQLApi]:
    """The GraphQL jobs/items API: 25 jobs per day, 25 items."""
    with GraphQLApi(25) as api:
        yield api


@pytest.fixture
def oauth_provider() -> Iterator[OAuth2Provider]:
    """An OAuth2 token endpoint rotating refresh tokens; access tokens serve 25 requests."""
    with OAuth2Provider() as provider:
        yield provider


@pytest.fixture
def video_api() -> Iterator[VideoApi]:
    """The YouTube-style search-then-details API: 25 videos."""
    with VideoApi(25) as api:
        yield api


@pytest.fixture
def scripted_connector() -> Iterator[None]:
    """The test-only ``scripted`` connector, registered for one test (``tests.fakes.scripted``);
    use it as ``pytestmark = pytest.mark.usefixtures("scripted_connector")``."""
    # The API's company models are fixed when pipeline.api.companies is first imported: import it
    # before registering, so a test that imports it lazily never freezes this connector in.
    import pipeline.api.companies  # noqa: F401

    with scripted.registered():
        yield
