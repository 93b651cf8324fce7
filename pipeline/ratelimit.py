"""The rate limiters live beside the HTTP client, in :mod:`connectors.rest.ratelimit`."""

from __future__ import annotations

from connectors.rest.ratelimit import DEFAULT_MARGIN, LocalRateLimiter, PostgresRateLimiter, make_rate_limiter

__all__ = ["DEFAULT_MARGIN", "LocalRateLimiter", "PostgresRateLimiter", "make_rate_limiter"]
