"""The declarative ``graphql`` connector: any paged GraphQL query, configured per company.

It shares the ``rest`` connector's HTTP client (retries, ``Retry-After``, the rate limit) and
auth (including OAuth2), and its page loop (``connectors.paging``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import httpx

from connectors.base import Chunk, ConnectorContext, FetchRequest, RateLimiter, Record, ResourceSpec
from connectors.graphql.config import GraphQLConfig, ResourceConfig, parse_config
from connectors.graphql.paginators import Paginator, make_paginator
from connectors.oauth2 import TokenStore
from connectors.paging import PageResult, fetch_chunk
from connectors.rest.config import NonePartitions, secret_paths, uses_placeholder
from connectors.rest.connector import (
    RestConnector,
    check_auth_admission,
    check_url_admission,
    connect_upstream,
    partition_keys,
    resource_spec,
)
from connectors.rest.paginators import MISSING, Page, lookup
from errors import ConfigError, ConnectorError, PipelineError, UpstreamError

# Codes providers use for a throttled query answered with HTTP 200 (Shopify: extensions.code
# THROTTLED; GitHub: type RATE_LIMITED): another attempt later may succeed.
THROTTLED_CODES = frozenset({"THROTTLED", "RATE_LIMITED", "RATE_LIMIT_EXCEEDED", "TOO_MANY_REQUESTS"})


@dataclass(frozen=True, slots=True)
class _Resource:
    spec: ResourceSpec
    config: ResourceConfig
    paginator: Paginator


def first_error(errors: list[Any]) -> tuple[str, bool]:
    """The first GraphQL error's message and whether it says the query was throttled."""
    error = errors[0]
    if not isinstance(error, dict):
        return str(error)[:1000], False
    message = str(error.get("message") or "no message")[:1000]
    extensions = error.get("extensions")
    codes = {str(error.get("type", "")).upper()}
    if isinstance(extensions, dict):
        codes.add(str(extensions.get("code", "")).upper())
    return message, bool(codes & THROTTLED_CODES)


def _throttled(response: httpx.Response) -> str | None:
    """Why a 200 must be retried with backoff: an ``errors`` array whose first error is a throttle."""
    try:
        body = response.json()
    except ValueError:
        return None
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list) or not errors:
        return None
    message, throttled = first_error(errors)
    return f"GraphQL throttled: {message}" if throttled else None


class GraphQLConnector:
    """A connector built from one company's ``graphql`` config (see ``connectors.graphql.config``).

    Parameters are those of ``RestConnector``: ``context`` says which variables ``auth`` may
    read and where connections may go (the SSRF guard and the response cap apply to the
    endpoint and the token URL), ``tokens`` is the company's OAuth2 token store.

    Raises:
        ConfigError: an invalid config, naming the key path.
    """

    name = "graphql"

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        limiter: RateLimiter | None = None,
        on_response: Callable[[int], None] | None = None,
        context: ConnectorContext | None = None,
        tokens: TokenStore | None = None,
    ) -> None:
        self.config: GraphQLConfig = parse_config(config)
        self._context = context or ConnectorContext()
        self._resources: dict[str, _Resource] = {}
        for name, resource in self.config.resources.items():
            if isinstance(resource.partitions, NonePartitions):
                for key, value in resource.variables.items():
                    if isinstance(value, str) and uses_placeholder(value, "partition"):
                        raise ConfigError(f"graphql config: resources.{name}.variables.{key}: uses {{partition}} "
                                          "but partitions.type is 'none'")
            spec = resource_spec(name, resource, resource.incremental.field if resource.incremental else None)
            self._resources[name] = _Resource(spec, resource, make_paginator(resource.paginator))
        upstream = connect_upstream(
            self.config, self.config.endpoint, context=self._context, limiter=limiter, on_response=on_response,
            tokens=tokens,
        )
        self._auth, self._token_client, self._http = upstream.auth, upstream.token_client, upstream.http

    def check_admission(self, context: ConnectorContext) -> None:
        """As ``RestConnector.check_admission``, for ``endpoint`` and the auth."""
        check_auth_admission(self.config, context, kind="graphql")
        check_url_admission(self.config.endpoint, context, key="endpoint", kind="graphql")

    def secret_paths(self) -> list[tuple[str | int, ...]]:
        return secret_paths(self.config)

    def resources(self) -> Sequence[ResourceSpec]:
        return [resource.spec for resource in self._resources.values()]

    def _resource(self, name: str) -> _Resource:
        try:
            return self._resources[name]
        except KeyError:
            offered = ", ".join(self._resources)
            raise ConnectorError(f"connector 'graphql' has no resource {name!r} (offers: {offered})") from None

    def partitions(self, resource: str, today: date) -> list[str]:
        return partition_keys(self._resource(resource).config.partitions, today)

    def fetch(self, request: FetchRequest) -> Chunk:
        """Fetch up to ``pages_per_chunk`` pages (POSTed queries) of one partition.

        Chunking, deadlines and retryable failures part-way through a chunk behave as in
        ``RestConnector.fetch``.

        Raises:
            UpstreamError: a response with an ``errors`` array, with the first error's message
                (its data, even partial, is dropped): permanent, except that a throttled query
                is retried with backoff like a 429 and, once retries run out, fails retryable;
                a malformed page; as ``RestConnector.fetch`` otherwise.
            ConfigError: as ``RestConnector.fetch``.
        """
        resource = self._resource(request.resource)
        check_auth_admission(self.config, self._context, kind="graphql")
        if self._auth is not None:
            self._auth.secret()  # a missing secret fails before a rate-limit slot is spent
        try:
            return self._fetch(resource, request)
        except PipelineError as exc:
            if self._auth is not None:
                # An upstream may echo the credential it was sent into its error body.
                exc.args = (self._auth.scrub(str(exc)),)
            raise

    def _fetch(self, resource: _Resource, request: FetchRequest) -> Chunk:
        variables = self._render(resource.config, request)
        state = dict(request.state) if request.state is not None else resource.paginator.initial_state()
        where = f"resource {resource.spec.name!r}, partition {request.partition!r}"

        def fetch_page(state: dict[str, Any], deadline: float | None) -> PageResult:
            try:
                page_variables = resource.paginator.update_variables(state, dict(variables))
            except (KeyError, TypeError, ValueError) as exc:
                raise ConnectorError(
                    f"resource {resource.spec.name!r}: the saved fetch state {state!r} does not fit its "
                    f"{resource.config.paginator.type} paginator; sync the partition again from the start"
                ) from exc
            body_json = {"query": resource.config.query, "variables": page_variables}
            response = self._http.request("POST", self.config.endpoint, json=body_json, deadline=deadline,
                                          hard_deadline=request.lease_deadline, retry_response=_throttled)
            try:
                body = RestConnector._decode(response)
                errors = body.get("errors") if isinstance(body, dict) else None
                if errors:
                    if not isinstance(errors, list):
                        raise UpstreamError(f"'errors' is {type(errors).__name__}, expected a list")
                    message, throttled = first_error(errors)
                    raise UpstreamError(f"the GraphQL response has {len(errors)} error(s), the first: {message}",
                                        retryable=throttled, status=response.status_code)
                records = self._read_records(resource.config, body)
                new_state, more = resource.paginator.update_state(state, Page(response, body, records))
            except UpstreamError as exc:
                raise UpstreamError(f"{where}, POST {response.request.url.path}: {exc}", retryable=exc.retryable,
                                    status=exc.status) from exc
            return PageResult(records, new_state, more)

        return fetch_chunk(
            fetch_page,
            state,
            max_pages=self.config.pages_per_chunk,
            deadline=request.deadline,
            requests_sent=lambda: self._http.requests_sent,
            label=f"{resource.spec.name}/{request.partition}",
            scrub=self._auth.scrub if self._auth is not None else None,
        )

    @staticmethod
    def _render(resource: ResourceConfig, request: FetchRequest) -> dict[str, Any]:
        values = {"partition": request.partition, "external_id": request.external_id}
        variables: dict[str, Any] = {}
        for name, template in resource.variables.items():
            if not isinstance(template, str):
                variables[name] = template
                continue
            for placeholder, value in values.items():
                if value is None and uses_placeholder(template, placeholder):
                    raise ConfigError(f"resource {request.resource!r} uses {{{placeholder}}} but the company has none")
            variables[name] = template.format(**{k: v for k, v in values.items() if v is not None})
        if resource.incremental is not None:
            variables[resource.incremental.variable] = request.since
        return variables

    @staticmethod
    def _read_records(resource: ResourceConfig, body: Any) -> list[Record]:
        records = lookup(body, resource.records)
        where = f"records path {resource.records!r}"
        if records is MISSING:
            raise UpstreamError(f"{where} is missing from the response")
        if not isinstance(records, list):
            kind = "null" if records is None else type(records).__name__
            raise UpstreamError(f"{where} is {kind}, expected a list of records")
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise UpstreamError(f"record #{index} in {where} is {type(record).__name__}, expected an object")
            if record.get(resource.primary_key) is None:
                raise UpstreamError(f"record #{index} in {where} has no primary key {resource.primary_key!r}")
        return records

    def close(self) -> None:
        self._http.close()
        if self._token_client is not None:
            self._token_client.close()
