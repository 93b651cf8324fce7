"""Every paginator reads every record exactly once, across chunks resumed from JSON state."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from connectors.base import FetchRequest
from connectors.transforms import dedupe, schedule
from pipeline.errors import ConfigError, ConnectorError
from tests.connectors.support import drain, loopback_connector, records_of
from tests.fakes.upstreams import CloseApi, FakeUpstream, ScheduleApi, StripeApi, _ListApi

DAY = "2024-05-01"
PAGES_PER_CHUNK = 3


def schedule_resource(size: int) -> dict[str, Any]:
    return {
        "path": "/api/dr-schedule",
        "params": {"startDate": "{partition}", "endDate": "{partition}"},
        "partitions": {"type": "daily", "days_ahead": 1},
        "records": "Result",
        "envelope": {"success": "IsSuccess", "message": "Message"},
        "primary_key": "JobInformationId",
        "paginator": {"type": "page", "page_param": "page", "size_param": "pageSize", "size": size},
        "transform": "schedule",
    }


def list_ids(api: FakeUpstream, _partition: str) -> list[Any]:
    assert isinstance(api, _ListApi)
    return [record["id"] for record in api.records()]


def job_ids(api: FakeUpstream, partition: str) -> list[Any]:
    assert isinstance(api, ScheduleApi)
    return [job["JobInformationId"] for job in api.jobs(partition)]


def user_ids(api: FakeUpstream, _partition: str) -> list[Any]:
    assert isinstance(api, ScheduleApi)
    return [user["EmployeeInformationId"] for user in api.employees()]


@dataclass(frozen=True)
class Case:
    fixture: str
    resource: dict[str, Any]
    expected: Callable[[FakeUpstream, str], list[Any]] = list_ids
    partition: str = "all"
    count: int = 25
    chunks_at_least: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


CLOSE_LEADS = {"path": "/api/v1/lead/", "records": "data", "primary_key": "id"}
STRIPE_CUSTOMERS = {"path": "/v1/customers", "records": "data", "primary_key": "id"}

CASES = {
    "page, short last page": Case("schedule_api", schedule_resource(4), job_ids, partition=DAY),
    "page, full last page": Case("schedule_api", schedule_resource(4), job_ids, partition=DAY, count=24),
    "offset with has_more": Case(
        "close_api",
        {
            **CLOSE_LEADS,
            "paginator": {
                "type": "offset",
                "offset_param": "_skip",
                "limit_param": "_limit",
                "limit": 4,
                "has_more": "has_more",
            },
        },
    ),
    "offset, short page ends": Case(
        "close_api",
        {**CLOSE_LEADS, "paginator": {"type": "offset", "offset_param": "_skip", "limit_param": "_limit", "limit": 4}},
    ),
    "cursor from the last primary key": Case(
        "stripe_api",
        {
            **STRIPE_CUSTOMERS,
            "paginator": {
                "type": "cursor",
                "cursor_param": "starting_after",
                "cursor_path": None,
                "has_more": "has_more",
                "limit_param": "limit",
                "limit": 4,
            },
        },
    ),
    "cursor from the last primary key, no has_more": Case(
        "stripe_api",
        {**STRIPE_CUSTOMERS, "paginator": {"type": "cursor", "limit_param": "limit", "limit": 4}},
        count=24,
    ),
    "cursor from a body path": Case(
        "stripe_api",
        {
            "path": "/v1/customers/search",
            "params": {"query": "email~'example.com'"},
            "records": "data",
            "primary_key": "id",
            "paginator": {
                "type": "cursor",
                "cursor_param": "page",
                "cursor_path": "next_page",
                "has_more": "has_more",
                "limit_param": "limit",
                "limit": 4,
            },
        },
    ),
    "link header": Case(
        "link_api", {"path": "/items", "params": {"per_page": 4}, "primary_key": "id", "paginator": {"type": "link"}}
    ),
    "none": Case(
        "schedule_api",
        {
            "path": "/api/dr-schedule/users",
            "records": "Result",
            "envelope": {"success": "IsSuccess", "message": "Message"},
            "primary_key": "EmployeeInformationId",
            "transform": "users",
        },
        user_ids,
        chunks_at_least=1,
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_paginator_reads_every_record_exactly_once_across_resumed_chunks(
    case: Case, request: pytest.FixtureRequest
) -> None:
    api: FakeUpstream = request.getfixturevalue(case.fixture)
    api.reset(count=case.count)
    config = {"base_url": api.base_url, "pages_per_chunk": PAGES_PER_CHUNK, "resources": {"items": case.resource}}

    chunks = drain(config, "items", case.partition)

    primary_key = case.resource["primary_key"]
    assert [record[primary_key] for record in records_of(chunks)] == case.expected(api, case.partition)
    assert len(chunks) >= case.chunks_at_least
    assert all(1 <= chunk.requests <= PAGES_PER_CHUNK for chunk in chunks)
    served = api.requests
    assert sum(chunk.requests for chunk in chunks) == len(served)
    assert {entry.status for entry in served} == {200}
    pages = [(entry.path, tuple(sorted(entry.params.items()))) for entry in served]
    assert len(set(pages)) == len(pages), "a page was requested twice"


def test_schedule_pages_feed_the_schedule_transform(schedule_api: ScheduleApi) -> None:
    config = {"base_url": schedule_api.base_url, "resources": {"schedule": schedule_resource(10)}}

    records = records_of(drain(config, "schedule", DAY))
    document = schedule(1, "schedule", DAY, dedupe(records, "JobInformationId"))

    assert document["counts"]["jobs"] == 25
    assert [job["id"] for job in document["jobs"]] == job_ids(schedule_api, DAY)


def test_a_chunk_past_its_deadline_stops_after_one_page(stripe_api: StripeApi) -> None:
    resource = CASES["cursor from the last primary key"].resource
    connector = loopback_connector({"base_url": stripe_api.base_url, "resources": {"customers": resource}})
    try:
        chunk = connector.fetch(
            FetchRequest(
                company_id=1, external_id=None, resource="customers", partition="all", deadline=time.monotonic()
            )
        )
    finally:
        connector.close()
    assert (chunk.requests, len(chunk.records), chunk.done) == (1, 4, False)
    assert chunk.state == {"cursor": "cus_000003"}


def test_external_id_and_partition_are_filled_into_params(schedule_api: ScheduleApi) -> None:
    resource = schedule_resource(50)
    resource["params"] = {**resource["params"], "companyCode": "{external_id}"}
    config = {"base_url": schedule_api.base_url, "resources": {"schedule": resource}}

    drain(config, "schedule", DAY, external_id="ACME 42")

    assert schedule_api.requests[0].params == {
        "startDate": DAY,
        "endDate": DAY,
        "companyCode": "ACME 42",
        "page": "1",
        "pageSize": "50",
    }
    with pytest.raises(ConfigError, match=r"uses \{external_id\} but the company has none"):
        drain(config, "schedule", DAY, external_id=None)


def test_a_saved_state_that_does_not_fit_the_paginator_is_a_clear_error(close_api: CloseApi) -> None:
    resource = CASES["offset with has_more"].resource
    connector = loopback_connector({"base_url": close_api.base_url, "resources": {"leads": resource}})
    request = FetchRequest(company_id=1, external_id=None, resource="leads", partition="all", state={"page": 3})
    try:
        with pytest.raises(ConnectorError, match="does not fit its offset paginator"):
            connector.fetch(request)
    finally:
        connector.close()
    assert close_api.requests == []
