"""Connector tests use the fake upstreams.

Re-exported here so these tests run before (and after) the root conftest declares
``pytest_plugins = ["tests.fakes.fixtures"]``.
"""

from tests.fakes.fixtures import close_api, link_api, schedule_api, stripe_api

__all__ = ["close_api", "link_api", "schedule_api", "stripe_api"]
