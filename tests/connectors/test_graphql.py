"""The ``graphql`` connector against a graphql-core server: paginators, errors, config checks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from connectors import registry
from connectors.base import FetchRequest
from connectors.graphql import GraphQLConnector
from connectors.transforms import dedupe
from pipeline.errors import ConfigError, UpstreamError
from tests.connectors.support import drain, loopback_context, records_of
from tests.fakes.graphql_api import GraphQLApi

DAY = "2024-05-01"
JOBS_QUERY = (
    "query($first: Int!, $after: String, $day: String!, $updatedSince: String) {"
    " jobs(first: $first, after: $after, day: $day, updatedSince: $updatedSince) {"
    " nodes { id title updatedAt } pageInfo { hasNextPage endCursor } } }"
)
ITEMS_QUERY = "query($skip: Int!, $first: Int!) { items(skip: $skip, first: $first) { id name updatedAt } }"


def relay_config(api: GraphQLApi, *, first: int = 4, pages_per_chunk: int = 2, **resource: Any) -> dict[str, Any]:
    return {
        "endpoint": f"{api.base_url}/graphql",
        "pages_per_chunk": pages_per_chunk,
        "retry": {"max_attempts": 3, "backoff_s": 0.01},
        "resources": {"jobs": {
            "query": JOBS_QUERY, "variables": {"day": "{partition}"},
            "partitions": {"type": "daily", "days_ahead": 1}, "records": "data.jobs.nodes",
            "paginator": {"type": "relay", "page_info": "data.jobs.pageInfo", "first": first},
            "primary_key": "id", "incremental": {"variable": "updatedSince", "field": "updatedAt"},
            **resource,
        }},
    }


def offset_config(api: GraphQLApi, *, limit: int = 4, pages_per_chunk: int = 2) -> dict[str, Any]:
    return {
        "endpoint": f"{api.base_url}/graphql",
        "pages_per_chunk": pages_per_chunk,
        "resources": {"items": {
            "query": ITEMS_QUERY, "records": "data.items", "primary_key": "id",
            "paginator": {"type": "offset", "offset_variable": "skip", "limit_variable": "first", "limit": limit},
        }},
    }


def sent_variables(api: GraphQLApi) -> list[dict[str, Any]]:
    return [entry.json()["variables"] for entry in api.requests]


@pytest.mark.parametrize("page_size", [1, 4, 7, 25, 100])
def test_relay_paginator_reads_every_record_once_across_chunks(graphql_api: GraphQLApi, page_size: int) -> None:
    chunks = drain(relay_config(graphql_api, first=page_size), "jobs", DAY, kind=GraphQLConnector)

    ids = [record["id"] for record in records_of(chunks)]
    assert ids == [job["id"] for job in graphql_api.jobs_of(DAY)]
    cursors = [variables["after"] for variables in sent_variables(graphql_api)]
    assert len(cursors) == len(set(cursors)), "a page was asked for twice"
    assert all(variables["day"] == DAY and variables["first"] == page_size for variables in sent_variables(graphql_api))
    assert len(chunks) == max(1, -(-len(cursors) // 2))


@pytest.mark.parametrize("limit", [1, 4, 5, 25, 30])
def test_offset_paginator_reads_every_record_once_across_chunks(graphql_api: GraphQLApi, limit: int) -> None:
    chunks = drain(offset_config(graphql_api, limit=limit), "items", kind=GraphQLConnector)

    assert [record["id"] for record in records_of(chunks)] == [item["id"] for item in graphql_api.records()]
    skips = [variables["skip"] for variables in sent_variables(graphql_api)]
    assert skips == list(range(0, len(skips) * limit, limit))


def test_an_errors_response_fails_with_the_first_message_and_keeps_no_partial_data(graphql_api: GraphQLApi) -> None:
    graphql_api.fail_next("graphql_errors", message="Field 'jobs' is unavailable for company 42", after=1)
    connector = GraphQLConnector(relay_config(graphql_api, pages_per_chunk=5), context=loopback_context())
    try:
        with pytest.raises(UpstreamError) as caught:
            connector.fetch(FetchRequest(company_id=1, external_id=None, resource="jobs", partition=DAY))
    finally:
        connector.close()
    assert not caught.value.retryable
    assert "Field 'jobs' is unavailable for company 42" in str(caught.value)
    assert f"resource 'jobs', partition '{DAY}', POST /graphql" in str(caught.value)


def test_a_throttled_errors_response_is_retried_with_backoff_like_a_429(graphql_api: GraphQLApi) -> None:
    graphql_api.fail_next("throttled", 2)

    chunks = drain(relay_config(graphql_api, first=25), "jobs", DAY, kind=GraphQLConnector)

    assert [r["id"] for r in records_of(chunks)] == [job["id"] for job in graphql_api.jobs_of(DAY)]
    assert chunks[0].requests == 3


def test_persistent_throttling_gives_up_as_a_retryable_error(graphql_api: GraphQLApi) -> None:
    graphql_api.fail_next("throttled", 100)

    with pytest.raises(UpstreamError) as caught:
        drain(relay_config(graphql_api), "jobs", DAY, kind=GraphQLConnector)

    assert caught.value.retryable
    assert "GraphQL throttled: Throttled" in str(caught.value) and "gave up after 3 attempts" in str(caught.value)
    assert len(graphql_api.requests) == 3


def test_throttling_after_the_first_page_ends_the_chunk_and_keeps_its_pages(graphql_api: GraphQLApi) -> None:
    graphql_api.fail_next("throttled", 3, after=1)

    chunks = drain(relay_config(graphql_api), "jobs", DAY, kind=GraphQLConnector)

    assert [r["id"] for r in records_of(chunks)] == [job["id"] for job in graphql_api.jobs_of(DAY)]
    assert len(chunks[0].records) == 4 and not chunks[0].done


def test_http_429_and_5xx_are_retried_by_the_shared_client(graphql_api: GraphQLApi) -> None:
    graphql_api.fail_next("rate_limit", 1, retry_after=0)
    graphql_api.fail_next("server_error", 1)

    chunks = drain(relay_config(graphql_api, first=25), "jobs", DAY, kind=GraphQLConnector)

    assert len(records_of(chunks)) == 25
    assert [entry.status for entry in graphql_api.requests] == [429, 500, 200]
    assert chunks[0].requests == 3


def test_a_server_side_query_error_names_the_upstream_message(graphql_api: GraphQLApi) -> None:
    error = None
    with pytest.raises(UpstreamError) as caught:
        drain(relay_config(graphql_api, first=101), "jobs", DAY, kind=GraphQLConnector)
    error = caught.value
    assert "exceeds the `first` limit of 100 records" in str(error) and not error.retryable


def test_incremental_sends_the_bookmark_and_merges_to_the_full_result(graphql_api: GraphQLApi) -> None:
    config = relay_config(graphql_api)
    first = records_of(drain(config, "jobs", DAY, kind=GraphQLConnector))
    bookmark = max(record["updatedAt"] for record in first)
    changed = [f"job_{DAY}_00003", f"job_{DAY}_00011"]
    graphql_api.touch(changed, title="moved")
    graphql_api.clear_requests()

    changes = records_of(drain(config, "jobs", DAY, kind=GraphQLConnector, since=bookmark))

    assert sorted(record["id"] for record in changes) == changed
    assert all(variables["updatedSince"] == bookmark for variables in sent_variables(graphql_api))
    merged = dedupe([*first, *changes], "id")
    assert merged == dedupe(records_of(drain(config, "jobs", DAY, kind=GraphQLConnector)), "id")


def test_a_malformed_page_info_fails_naming_it(graphql_api: GraphQLApi) -> None:
    graphql_api.fail_next("malformed", variant="not_list")

    with pytest.raises(UpstreamError, match=r"records path 'data\.jobs\.nodes' is str, expected a list"):
        drain(relay_config(graphql_api), "jobs", DAY, kind=GraphQLConnector)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"query": "query { jobs(day: \"x\", first: 1) { nodes { id } }"},
         "resources.jobs.query: not a valid GraphQL document: Syntax Error"),
        ({"query": "mutation { x }"}, "must be a query, not a mutation"),
        ({"query": "query($first: Int!, $day: String!) { x }"},
         "resources.jobs: query: does not declare $after (paginator)"),
        ({"variables": {"day": "{when}"}}, "resources.jobs.variables: day: unknown placeholder {when}"),
        ({"paginator": {"type": "relay"}}, "resources.jobs.paginator.page_info: Field required"),
        ({"paginator": {"type": "pages"}}, "resources.jobs.paginator.type: 'pages' is not one of"),
        ({"partitions": {"type": "none"}}, "uses {partition} but partitions.type is 'none'"),
    ],
)
def test_a_bad_config_is_refused_naming_the_key(graphql_api: GraphQLApi, change: dict[str, Any], problem: str) -> None:
    config = relay_config(graphql_api)
    config["resources"]["jobs"].update(change)

    with pytest.raises(ConfigError) as caught:
        registry.validate("graphql", json.loads(json.dumps(config)))

    assert problem in str(caught.value)
    assert graphql_api.requests == []


def test_the_none_paginator_reads_one_page(graphql_api: GraphQLApi) -> None:
    config = {
        "endpoint": f"{graphql_api.base_url}/graphql",
        "resources": {"items": {"query": "query { items(first: 100) { id } }", "records": "data.items",
                                "primary_key": "id"}},
    }

    chunks = drain(config, "items", kind=GraphQLConnector)

    assert [r["id"] for r in records_of(chunks)] == [item["id"] for item in graphql_api.records()]
    assert len(graphql_api.requests) == 1 and chunks[0].done
