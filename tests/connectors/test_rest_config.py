"""The ``rest`` connector's config: accepted shapes, rejected ones named by key, resources, partitions."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import date
from typing import Any

import pytest

from connectors import registry
from connectors.base import ConnectorContext
from connectors.rest import RestConnector
from connectors.transforms import POLICIES
from pipeline.errors import ConfigError, ConnectorError

Config = dict[str, Any]

SCHEDULE_CONFIG: Config = {
    "base_url": "https://api.example.com/",
    "auth": {"type": "bearer", "token_env": "CONNECTOR_SCHEDULE_API_TOKEN"},
    "timeout_s": 30,
    "rate_limit": {"requests_per_second": 5},
    "resources": {
        "schedule": {
            "path": "/api/dr-schedule",
            "params": {"startDate": "{partition}", "endDate": "{partition}"},
            "partitions": {"type": "daily", "days_ahead": 7, "days_back": 0},
            "records": "Result",
            "envelope": {"success": "IsSuccess", "message": "Message"},
            "primary_key": "JobInformationId",
            "paginator": {"type": "page", "page_param": "page", "size_param": "pageSize", "size": 100},
            "transform": "schedule",
        },
        "users": {
            "path": "/api/dr-schedule/users",
            "partitions": {"type": "none"},
            "records": "Result",
            "primary_key": "EmployeeInformationId",
            "paginator": {"type": "none"},
            "incremental": {"param": "updated_since", "field": "updated_at"},
            "transform": "users",
        },
    },
}


def changed(change: Callable[[Config], object]) -> Config:
    config = copy.deepcopy(SCHEDULE_CONFIG)
    change(config)
    return config


def schedule(config: Config) -> Config:
    resource: Config = config["resources"]["schedule"]
    return resource


def test_the_issue_example_config_builds_through_the_registry() -> None:
    connector = registry.build("rest", SCHEDULE_CONFIG)
    try:
        assert isinstance(connector, RestConnector)
        assert "rest" in registry.names()
        assert connector.config.base_url == "https://api.example.com"
    finally:
        connector.close()


def test_every_paginator_shape_of_the_issue_is_accepted() -> None:
    shapes = [
        {"type": "none"},
        {"type": "offset", "offset_param": "offset", "limit_param": "limit", "limit": 100, "has_more": "has_more"},
        {"type": "page", "page_param": "page", "size_param": "pageSize", "size": 100, "first_page": 1},
        {"type": "cursor", "cursor_param": "starting_after", "cursor_path": "next_cursor", "has_more": "has_more"},
        {"type": "cursor", "cursor_param": "starting_after", "cursor_path": None, "has_more": "has_more"},
        {"type": "link"},
    ]
    for shape in shapes:
        config = copy.deepcopy(SCHEDULE_CONFIG)
        schedule(config)["paginator"] = shape
        registry.validate("rest", config)


@pytest.mark.parametrize(
    ("change", "key_path"),
    [
        (lambda c: schedule(c).update(paginator={"type": "pages"}), "resources.schedule.paginator.type"),
        (lambda c: schedule(c).update(paginator={"size": 10}), "resources.schedule.paginator.type"),
        (lambda c: schedule(c)["paginator"].update(size=0), "resources.schedule.paginator.size"),
        (lambda c: schedule(c)["paginator"].update(sise=10), "resources.schedule.paginator.sise"),
        (lambda c: schedule(c)["partitions"].update(days_ahead=-1), "resources.schedule.partitions.days_ahead"),
        (lambda c: schedule(c).update(partitions={"type": "weekly"}), "resources.schedule.partitions.type"),
        (lambda c: schedule(c).update(transform="xml"), "resources.schedule.transform"),
        (lambda c: schedule(c).update(path="/api/{company}"), "resources.schedule.path"),
        (lambda c: schedule(c).update(path="api/dr-schedule"), "resources.schedule.path"),
        (lambda c: schedule(c)["params"].update(endDate="{tomorrow}"), "resources.schedule.params"),
        (lambda c: schedule(c)["params"].update(ids=[1, 2]), "resources.schedule.params"),
        (lambda c: schedule(c).update(records="Result..Items"), "resources.schedule.records"),
        (lambda c: schedule(c)["envelope"].pop("success"), "resources.schedule.envelope.success"),
        (lambda c: schedule(c).pop("primary_key"), "resources.schedule.primary_key"),
        (lambda c: schedule(c).update(incremental={"param": "since"}), "resources.schedule.incremental.field"),
        (lambda c: c["resources"].update({"bad/name": schedule(c)}), "resources.bad/name"),
        (lambda c: c.update(resources={}), "resources"),
        (lambda c: c.update(auth={"type": "basic"}), "auth.type"),
        (lambda c: c["auth"].update(token_env="sk live 123"), "auth.token_env"),
        (lambda c: c.update(auth={"type": "header", "name": "X-Api-Key"}), "auth"),  # neither value nor value_env
        (lambda c: c.update(base_url="ftp://api.example.com"), "base_url"),
        (lambda c: c.pop("base_url"), "base_url"),
        (lambda c: c.update(timeout_s=0), "timeout_s"),
        (lambda c: c["rate_limit"].update(requests_per_second=-5), "rate_limit.requests_per_second"),
        (lambda c: c.update(pages_per_chunk=0), "pages_per_chunk"),
        (lambda c: c.update(retries=3), "retries"),
    ],
)
def test_invalid_config_is_rejected_naming_the_key_path(change: Callable[[Config], object], key_path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        registry.validate("rest", changed(change))
    assert f"{key_path}:" in str(caught.value)


def test_a_secret_pasted_instead_of_a_variable_name_is_not_echoed() -> None:
    config = changed(lambda c: c["auth"].update(token_env="sk_live_51H-abc.def"))
    with pytest.raises(ConfigError) as caught:
        RestConnector(config)
    message = str(caught.value)
    assert "auth.token_env" in message
    assert "sk_live_51H-abc.def" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_partition_placeholder_on_an_unpartitioned_resource_is_rejected() -> None:
    config = changed(lambda c: c["resources"]["users"].update(params={"day": "{partition}"}))
    with pytest.raises(ConfigError, match=r"resources\.users\.params\.day: uses \{partition\}"):
        RestConnector(config)


def test_resource_specs_carry_key_transform_policy_and_incremental_field() -> None:
    connector = RestConnector(SCHEDULE_CONFIG)
    specs = {spec.name: spec for spec in connector.resources()}
    assert specs["schedule"].primary_key == "JobInformationId"
    assert specs["schedule"].transform == "schedule"
    assert specs["schedule"].policy == POLICIES["schedule"]
    assert specs["schedule"].incremental_field is None
    assert specs["users"].incremental_field == "updated_at"
    assert specs["users"].policy == POLICIES["users"]


def test_daily_partitions_run_from_days_back_to_days_ahead_counting_today() -> None:
    config = changed(lambda c: schedule(c)["partitions"].update(days_ahead=3, days_back=2))
    connector = RestConnector(config)
    assert connector.partitions("schedule", date(2024, 2, 28)) == [
        "2024-02-26",
        "2024-02-27",
        "2024-02-28",
        "2024-02-29",
        "2024-03-01",
    ]
    assert connector.partitions("users", date(2024, 2, 28)) == ["all"]


def test_unknown_resource_is_a_connector_error_naming_the_offered_ones() -> None:
    connector = RestConnector(SCHEDULE_CONFIG)
    with pytest.raises(ConnectorError, match="offers: schedule, users"):
        connector.partitions("invoices", date(2024, 1, 1))


def test_reprs_name_secret_variables_only() -> None:
    context = ConnectorContext(environ={"CONNECTOR_SCHEDULE_API_TOKEN": "tok-value-123"})
    connector = RestConnector(SCHEDULE_CONFIG, context=context)
    text = repr(connector.config) + repr(connector.__dict__) + repr(connector._http.__dict__)
    assert "CONNECTOR_SCHEDULE_API_TOKEN" in text
    assert "tok-value-123" not in text
