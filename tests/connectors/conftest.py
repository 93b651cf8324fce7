"""Connector tests use the fake upstreams.

Re-exported here so these tests run before (and after) the root conftest declares
``pytest_plugins = ["tests.fakes.fixtures"]``.
"""

from tests.fakes.fixtures import (
    close_api,
    graphql_api,
    link_api,
    oauth_provider,
    schedule_api,
    stripe_api,
    video_api,
)

__all__ = ["close_api", "graphql_api", "link_api", "oauth_provider", "schedule_api", "stripe_api", "video_api"]
