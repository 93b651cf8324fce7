"""Upstream failures: retries, Retry-After, non-retryable errors, malformed pages, auth, incremental."""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from connectors.base import FetchRequest
from connectors.rest.http import parse_retry_after
from connectors.transforms import dedupe
from pipeline.errors import ConfigError, UpstreamError
from tests.connectors.support import SECRET, drain, loopback_connector, records_of
from tests.fakes.upstreams import CloseApi, LinkApi, ScheduleApi, StripeApi

FAST_RETRY = {"max_attempts": 4, "backoff_s": 0.01, "max_backoff_s": 0.05}
DAY = "2024-05-01"


def stripe_config(api: StripeApi, **overrides: Any) -> dict[str, Any]:
    return {
        "base_url": api.base_url,
        "retry": FAST_RETRY,
        "resources": {
            "customers": {
                "path": "/v1/customers",
                "records": "data",
                "primary_key": "id",
                "paginator": {"type": "cursor", "has_more": "has_more", "limit_param": "limit", "limit": 100},
                "incremental": {"param": "updated_since", "field": "updated_at"},
            }
        },
        **overrides,
    }


def schedule_config(api: ScheduleApi, **resource_overrides: Any) -> dict[str, Any]:
    return {
        "base_url": api.base_url,
        "retry": FAST_RETRY,
        "resources": {
            "schedule": {
                "path": "/api/dr-schedule",
                "params": {"startDate": "{partition}", "endDate": "{partition}"},
                "partitions": {"type": "daily", "days_ahead": 1},
                "records": "Result",
                "envelope": {"success": "IsSuccess", "message": "Message"},
                "primary_key": "JobInformationId",
                "paginator": {"type": "page", "size": 100},
                "transform": "schedule",
                **resource_overrides,
            }
        },
    }


def fetch_error(config: dict[str, Any], resource: str, partition: str = "all") -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        drain(config, resource, partition)
    return caught.value


@pytest.mark.parametrize("http_date", [False, True], ids=["seconds", "http-date"])
def test_429_waits_as_long_as_retry_after_says(stripe_api: StripeApi, http_date: bool) -> None:
    stripe_api.fail_next("rate_limit", 1, retry_after=1, http_date=http_date)

    chunks = drain(stripe_config(stripe_api), "customers")

    assert len(records_of(chunks)) == 25
    limited, retried = stripe_api.requests
    assert (limited.status, retried.status) == (429, 200)
    assert retried.at - limited.at >= 0.95
    assert chunks[0].requests == 2


def test_retry_after_parses_seconds_and_http_dates() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3", now=now) == 3.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), now=now) == 7.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=7), usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after("-1", now=now) is None
    assert parse_retry_after(None, now=now) is None


def test_transient_500s_are_retried(stripe_api: StripeApi) -> None:
    stripe_api.fail_next("server_error", 2)

    chunks = drain(stripe_config(stripe_api), "customers")

    assert len(records_of(chunks)) == 25
    assert [entry.status for entry in stripe_api.requests] == [500, 500, 200]
    assert chunks[0].requests == 3


def test_persistent_500s_give_up_as_a_retryable_error(stripe_api: StripeApi) -> None:
    stripe_api.fail_next("server_error", 100)

    error = fetch_error(stripe_config(stripe_api), "customers")

    assert (error.retryable, error.status) == (True, 500)
    assert "gave up after 4 attempts" in str(error)
    assert len(stripe_api.requests) == 4


def test_a_retry_after_past_the_deadline_fails_at_once_as_retryable(stripe_api: StripeApi) -> None:
    stripe_api.fail_next("rate_limit", 1, retry_after=30)
    connector = loopback_connector(stripe_config(stripe_api))
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        connector.fetch(
            FetchRequest(company_id=1, external_id=None, resource="customers", partition="all", deadline=started + 5)
        )
    connector.close()
    # Waiting would take 30 s; the product promises to give up before the 5 s deadline.
    assert time.monotonic() - started < 5
    assert (caught.value.retryable, caught.value.status) == (True, 429)
    assert "Retry-After" in str(caught.value) and "time budget" in str(caught.value)
    assert len(stripe_api.requests) == 1


def test_a_failure_after_the_first_page_ends_the_chunk_and_keeps_its_pages(stripe_api: StripeApi) -> None:
    config = stripe_config(stripe_api, retry={"max_attempts": 2, "backoff_s": 0.01})
    config["resources"]["customers"]["paginator"]["limit"] = 10
    stripe_api.fail_next("server_error", 4, after=1)
    request = FetchRequest(company_id=1, external_id=None, resource="customers", partition="all")
    connector = loopback_connector(config)
    try:
        first = connector.fetch(request)
        assert (len(first.records), first.done, first.state, first.requests) == (10, False, {"cursor": "cus_000009"}, 3)
        with pytest.raises(UpstreamError) as caught:
            connector.fetch(replace(request, state=first.state))
        assert caught.value.retryable
        rest = connector.fetch(replace(request, state=first.state))
    finally:
        connector.close()
    assert [record["id"] for record in first.records + rest.records] == [f"cus_{i:06d}" for i in range(25)]


def test_401_fails_at_once_with_the_status_and_the_body(schedule_api: ScheduleApi) -> None:
    schedule_api.fail_next("unauthorized")

    error = fetch_error(schedule_config(schedule_api), "schedule", DAY)

    assert (error.retryable, error.status) == (False, 401)
    assert "HTTP 401" in str(error) and "Authorization has been denied" in str(error)
    assert len(schedule_api.requests) == 1


def test_other_4xx_fail_at_once_with_a_bounded_excerpt(schedule_api: ScheduleApi) -> None:
    config = schedule_config(schedule_api, params={"startDate": "{partition}", "endDate": "x" * 500})

    error = fetch_error(config, "schedule", DAY)

    assert (error.retryable, error.status) == (False, 400)
    assert "HTTP 400" in str(error) and "The value 'xxxxxxxx" in str(error)
    assert len(str(error)) < 300 and str(error).endswith("…")
    assert len(schedule_api.requests) == 1


def test_is_success_false_fails_with_the_upstream_message(schedule_api: ScheduleApi) -> None:
    schedule_api.fail_next("not_success", message="Company 42 is not active")

    error = fetch_error(schedule_config(schedule_api), "schedule", DAY)

    assert not error.retryable
    assert "Company 42 is not active" in str(error)
    assert "IsSuccess=False" in str(error)


@pytest.mark.parametrize(
    ("variant", "problem"),
    [
        ("missing", "records path 'Result' is missing from the response"),
        ("not_list", "records path 'Result' is str, expected a list of records"),
        ("not_json", "the response is not JSON (text/html)"),
    ],
)
def test_a_malformed_page_fails_naming_the_problem(schedule_api: ScheduleApi, variant: Any, problem: str) -> None:
    schedule_api.fail_next("malformed", variant=variant)

    error = fetch_error(schedule_config(schedule_api), "schedule", DAY)

    assert not error.retryable
    assert problem in str(error)
    assert f"resource 'schedule', partition '{DAY}', GET /api/dr-schedule" in str(error)


def test_a_body_that_is_not_a_list_fails_a_link_resource(link_api: LinkApi) -> None:
    link_api.fail_next("malformed")
    config = {"base_url": link_api.base_url, "resources": {"items": {"path": "/items", "primary_key": "id"}}}

    error = fetch_error(config, "items")

    assert "the response body is dict, expected a list of records" in str(error)


def test_records_without_the_primary_key_fail_naming_the_key(schedule_api: ScheduleApi) -> None:
    error = fetch_error(schedule_config(schedule_api, primary_key="JobId"), "schedule", DAY)

    assert "record #0 in records path 'Result' has no primary key 'JobId'" in str(error)


def test_connection_errors_are_retried_then_fail_as_retryable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {
        "base_url": f"http://127.0.0.1:{port}",
        "retry": {"max_attempts": 3, "backoff_s": 0.01},
        "resources": {"items": {"path": "/items", "primary_key": "id"}},
    }

    error = fetch_error(config, "items")

    assert (error.retryable, error.status) == (True, None)
    assert "ConnectError" in str(error) and "gave up after 3 attempts" in str(error)


def test_every_response_status_reaches_the_metrics_hook(stripe_api: StripeApi) -> None:
    statuses: list[int] = []
    stripe_api.fail_next("rate_limit", 1, retry_after=0)
    stripe_api.fail_next("server_error", 1)
    connector = loopback_connector(stripe_config(stripe_api), on_response=statuses.append)
    try:
        connector.fetch(FetchRequest(company_id=1, external_id=None, resource="customers", partition="all"))
    finally:
        connector.close()
    assert statuses == [429, 500, 200]


def test_bearer_secret_is_sent_but_never_shown(stripe_api: StripeApi) -> None:
    stripe_api.require_header("Authorization", f"Bearer {SECRET}")
    config = stripe_config(stripe_api, auth={"type": "bearer", "token_env": "CONNECTOR_STRIPE_KEY"})

    chunks = drain(config, "customers", environ={"CONNECTOR_STRIPE_KEY": SECRET})
    assert len(records_of(chunks)) == 25

    stripe_api.fail_next("unauthorized")
    with pytest.raises(UpstreamError) as caught:
        drain(config, "customers", environ={"CONNECTOR_STRIPE_KEY": SECRET})
    assert SECRET not in str(caught.value)
    connector = loopback_connector(config, environ={"CONNECTOR_STRIPE_KEY": SECRET})
    assert SECRET not in repr(vars(connector)) + repr(vars(connector._http))
    connector.close()


def test_header_secret_is_sent_from_its_variable(close_api: CloseApi) -> None:
    close_api.require_header("X-Api-Key", SECRET)
    config = {
        "base_url": close_api.base_url,
        "auth": {"type": "header", "name": "X-Api-Key", "value_env": "CONNECTOR_CLOSE_KEY"},
        "resources": {"leads": {"path": "/api/v1/lead/", "records": "data", "primary_key": "id"}},
    }

    assert len(records_of(drain(config, "leads", environ={"CONNECTOR_CLOSE_KEY": SECRET}))) == 25
    with pytest.raises(UpstreamError, match="HTTP 401"):
        drain(config, "leads", environ={"CONNECTOR_CLOSE_KEY": "wrong"})


def test_a_missing_secret_variable_is_a_config_error_naming_it(stripe_api: StripeApi) -> None:
    config = stripe_config(stripe_api, auth={"type": "bearer", "token_env": "CONNECTOR_STRIPE_KEY"})

    with pytest.raises(ConfigError, match="environment variable CONNECTOR_STRIPE_KEY is not set"):
        drain(config, "customers", environ={})
    assert stripe_api.requests == []


def test_incremental_sync_asks_only_for_changes_and_merges_to_the_full_result(close_api: CloseApi) -> None:
    config = {
        "base_url": close_api.base_url,
        "pages_per_chunk": 2,
        "resources": {
            "leads": {
                "path": "/api/v1/lead/",
                "records": "data",
                "primary_key": "id",
                "paginator": {
                    "type": "offset",
                    "offset_param": "_skip",
                    "limit_param": "_limit",
                    "limit": 4,
                    "has_more": "has_more",
                },
                "incremental": {"param": "updated_since", "field": "updated_at"},
            }
        },
    }
    first = records_of(drain(config, "leads"))
    bookmark = max(record["updated_at"] for record in first)
    close_api.touch(["lead_000003", "lead_000017", "lead_000024"], status_label="Won")
    close_api.clear_requests()

    changes = records_of(drain(config, "leads", since=bookmark))

    assert sorted(record["id"] for record in changes) == ["lead_000003", "lead_000017", "lead_000024"]
    assert all(entry.params["updated_since"] == bookmark for entry in close_api.requests)
    assert len(close_api.requests) == 1
    merged = dedupe([*first, *changes], "id")
    assert merged == dedupe(records_of(drain(config, "leads")), "id")


def test_backoff_retries_stop_before_the_deadline(stripe_api: StripeApi) -> None:
    stripe_api.fail_next("server_error", 1_000)
    config = stripe_config(stripe_api, retry={"max_attempts": 20, "backoff_s": 0.3, "max_backoff_s": 0.3})
    connector = loopback_connector(config)
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamError) as caught:
            connector.fetch(FetchRequest(company_id=1, external_id=None, resource="customers", partition="all",
                                         deadline=started + 1.0))
    finally:
        connector.close()
    last_request = stripe_api.requests[-1].at
    assert last_request <= started + 1.0, "no retry was sent after the deadline"
    assert caught.value.retryable and "would exceed the time budget" in str(caught.value)
    assert 2 <= len(stripe_api.requests) < 20
