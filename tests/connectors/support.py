"""Helpers for connector tests: drive a connector chunk by chunk the way the worker does."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from connectors.base import Chunk, ConnectorContext, FetchRequest, RateLimiter, Record
from connectors.graphql import GraphQLConnector
from connectors.net import NetworkPolicy
from connectors.oauth2 import TokenStore
from connectors.rest import RestConnector

SECRET = "sk_test_51Hsecret-value-never-logged"
# The fake upstreams listen on loopback, which the SSRF guard refuses unless allowlisted.
LOOPBACK = NetworkPolicy.parse("127.0.0.0/8")


def loopback_context(environ: Mapping[str, str] | None = None, **network: Any) -> ConnectorContext:
    """What a worker allows with ``PIPELINE_UPSTREAM_ALLOWLIST=127.0.0.0/8``."""
    policy = NetworkPolicy.parse("127.0.0.0/8", **network) if network else LOOPBACK
    return ConnectorContext(environ=dict(environ or {}), network=policy)


def loopback_connector(
    config: Mapping[str, Any], *, environ: Mapping[str, str] | None = None, **kwargs: Any
) -> RestConnector:
    """A ``RestConnector`` allowed to reach the loopback fakes."""
    return RestConnector(config, context=loopback_context(environ), **kwargs)


def drain(
    config: Mapping[str, Any],
    resource: str,
    partition: str = "all",
    *,
    since: str | None = None,
    external_id: str | None = None,
    limiter: RateLimiter | None = None,
    environ: Mapping[str, str] | None = None,
    max_chunks: int = 1_000,
    kind: type[RestConnector] | type[GraphQLConnector] = RestConnector,
    tokens: TokenStore | None = None,
) -> list[Chunk]:
    """Fetch a whole partition, one chunk per connector built from ``config``.

    Between chunks the connector is rebuilt and the state goes through JSON, as it does when
    a continuation message resumes a task from ``sync_tasks.fetch_state``.
    """
    chunks: list[Chunk] = []
    state: dict[str, Any] | None = None
    for _ in range(max_chunks):
        connector = kind(config, limiter=limiter, context=loopback_context(environ), tokens=tokens)
        try:
            chunk = connector.fetch(
                FetchRequest(
                    company_id=1,
                    external_id=external_id,
                    resource=resource,
                    partition=partition,
                    state=state,
                    since=since,
                )
            )
        finally:
            connector.close()
        chunks.append(chunk)
        if chunk.done:
            return chunks
        state = json.loads(json.dumps(chunk.state))
    raise AssertionError(f"{resource}/{partition} did not finish in {max_chunks} chunks")


def records_of(chunks: list[Chunk]) -> list[Record]:
    return [record for chunk in chunks for record in chunk.records]
