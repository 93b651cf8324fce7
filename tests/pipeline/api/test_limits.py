"""Bounded requests (body cap, event-stream cap, paged listing) and the contract rules the schema states."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine

from pipeline.api import create_app
from pipeline.api.control import ControlState
from pipeline.companies import add_company
from pipeline.control import cancel_job
from pipeline.planning import plan_job
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from storage.base import BlobStore
from tests.pipeline.api.conftest import Api, start_api
from tests.pipeline.api.helpers import employee_ids, jobs_of, publish_document, schedule_document
from tests.services import wait_for

KEY = "limits-admin-key"
ADMIN = {"X-API-Key": KEY}


@pytest.fixture
def limited_api(api_settings: Settings, api_engine: Engine, local_store: BlobStore) -> Iterator[Api]:
    settings = api_settings.model_copy(
        update={"admin_api_key": KEY, "api_max_body_bytes": 4096, "api_max_event_streams": 1}
    )
    yield from start_api(settings, api_engine, local_store)


def error_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return str(body["error"]["code"])


def test_a_body_over_the_cap_is_answered_413_with_a_json_error_declared_or_chunked(limited_api: Api) -> None:
    big = orjson.dumps({"name": "x" * 5000, "connector": "synthetic"})
    declared = limited_api.client.post("/companies", content=big, headers={**ADMIN, "Content-Type": "application/json"})
    assert declared.status_code == 413 and error_code(declared) == "body_too_large"
    assert "PIPELINE_API_MAX_BODY_BYTES" in declared.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it is read
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    json_headers = {**ADMIN, "Content-Type": "application/json"}
    chunked = limited_api.client.post("/companies", content=chunks(), headers=json_headers)
    assert chunked.status_code == 413 and error_code(chunked) == "body_too_large"
    small = limited_api.client.post("/companies", json={"name": "small", "connector": "synthetic"}, headers=ADMIN)
    assert small.status_code == 201, small.text


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """``app`` under a real uvicorn on a free loopback port (streams need a real server)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30, what="uvicorn to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_event_streams_beyond_the_cap_get_503_with_retry_after_and_an_ended_one_frees_its_slot(
    limited_api: Api,
) -> None:
    company = add_company(limited_api.engine, name="streams", connector="synthetic", config={"days_ahead": 1})
    planned = plan_job(limited_api.engine, None, trigger="api", company_ids=[company.id])  # queued, never run
    assert planned is not None
    cancel_job(limited_api.engine, job_id=planned.job_id)  # finished: its stream is a snapshot and an end
    runtime = Runtime(settings=limited_api.settings, engine=limited_api.engine, store=limited_api.store)
    app = create_app(runtime)
    app.state.control = ControlState(runtime)
    slots = app.state.control.streams
    events = f"/sync/jobs/{planned.job_id}/events"
    with served(app) as url, httpx.Client(base_url=url, headers=ADMIN, timeout=30) as client:
        taken = slots.acquire()  # the one slot of this process, as an open stream holds it
        with client.stream("GET", events) as refused:  # headers only: a 200 here would not end soon
            assert refused.status_code == 503, refused.headers
            refused.read()
            assert error_code(refused) == "too_many_streams"
            assert refused.headers["retry-after"].isdigit()
        taken()
        with client.stream("GET", events) as served_stream:
            assert served_stream.status_code == 200
            lines = list(served_stream.iter_lines())
        assert any(line == "event: end" for line in lines), lines
        wait_for(lambda: slots.open == 0, timeout=30, what="the ended stream's slot to be released")
        assert client.get(events).status_code == 200  # and it can be taken again


def test_the_partition_listing_is_paged_with_after_and_a_next_link(api: Api) -> None:
    tenant = api.add_tenant()
    days = [f"2030-02-{day:02d}" for day in range(1, 6)]
    for day in days:
        publish_document(
            api.engine, api.store, company_id=tenant.id, resource="schedule", partition=day,
            document=schedule_document(tenant.id, day),
        )
    headers = api.headers(tenant.id, "manager")
    seen: list[str] = []
    url: str | None = "/v1/schedule?limit=2"
    while url is not None:
        page = api.client.get(url, headers=headers)
        assert page.status_code == 200, page.text
        assert len(page.json()) <= 2
        seen += [item["partition"] for item in page.json()]
        link = page.headers.get("link")
        url = link.split(";")[0].strip("<>") if link else None
    assert seen == sorted(["2030-01-15", *days])
    assert api.client.get("/v1/schedule?limit=0", headers=headers).status_code == 422
    assert api.client.get("/v1/schedule?limit=501", headers=headers).status_code == 422
    # A technician's counts are those of their view, page by page.
    employee = employee_ids(tenant.schedule)[0]
    as_technician = api.headers(tenant.id, "technician", employee)
    technician = api.client.get("/v1/schedule", params={"after": "2030-01-01", "limit": 1}, headers=as_technician)
    assert technician.json()[0]["partition"] == "2030-01-15"
    assert technician.json()[0]["record_count"] == len(jobs_of(tenant.schedule, employee))


@pytest.fixture
def admin_api(api_settings: Settings, api_engine: Engine, local_store: BlobStore) -> Iterator[Api]:
    yield from start_api(api_settings.model_copy(update={"admin_api_key": KEY}), api_engine, local_store)


@pytest.mark.parametrize(
    ("method", "path", "documented"),
    [
        ("OPTIONS", "/companies/1", {"GET", "PATCH"}),
        ("DELETE", "/companies/1", {"GET", "PATCH"}),
        ("OPTIONS", "/companies", {"GET", "POST"}),
        ("PUT", "/sync/jobs/00000000-0000-0000-0000-000000000000/cancel", {"POST"}),
    ],
)
def test_an_undeclared_method_gets_405_whose_allow_names_every_method_of_the_path(
    admin_api: Api, method: str, path: str, documented: set[str]
) -> None:
    answer = admin_api.client.request(method, path, headers=ADMIN)
    assert answer.status_code == 405 and error_code(answer) == "method_not_allowed"
    assert {item.strip() for item in answer.headers["allow"].split(",")} - {"HEAD"} == documented


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"enabled": 0}, "enabled"),
        ({"enabled": "true"}, "enabled"),
        ({"name": 5}, "name"),
        ({"name": "   "}, "name"),
        ({"toggles": {"TechDashboard_HideDiscounts": 1}}, "toggles"),
        ({"config": {"jobs_per_day": "5"}}, "jobs_per_day"),
        ({"name": "a\x00b"}, "name"),
        ({"config": {"fail_partitions": ["2030-01-01\x00"]}}, "fail_partitions"),
    ],
)
def test_request_models_are_strict_and_refuse_coercion_and_nul_naming_the_field(
    admin_api: Api, body: dict[str, Any], named: str
) -> None:
    company = add_company(admin_api.engine, name="strict", connector="synthetic", config={}).id
    answer = admin_api.client.patch(f"/companies/{company}", json=body, headers=ADMIN)
    assert answer.status_code == 422, answer.text
    assert named in answer.json()["error"]["message"]


def test_an_integral_json_number_is_an_integer_and_ids_stop_at_2_to_the_53(admin_api: Api) -> None:
    company = add_company(admin_api.engine, name="numbers", connector="synthetic", config={}).id
    patched = admin_api.client.patch(f"/companies/{company}", json={"config": {"jobs_per_day": 5.0}}, headers=ADMIN)
    assert patched.status_code == 200, patched.text
    unknown = admin_api.client.post("/sync", json={"company_ids": [987654321.0]}, headers=ADMIN)
    assert unknown.status_code == 404 and error_code(unknown) == "unknown_company"
    assert admin_api.client.post("/sync", json={"company_ids": [2**53]}, headers=ADMIN).status_code == 422
    assert admin_api.client.get(f"/companies/{2**53}", headers=ADMIN).status_code == 422


def test_a_config_for_another_connector_is_a_409_and_changes_nothing(admin_api: Api) -> None:
    company = add_company(admin_api.engine, name="rest", connector="synthetic", config={"seed": 3}).id
    rest = {"base_url": "https://api.example.com", "resources": {"jobs": {"path": "/jobs", "primary_key": "id"}}}
    answer = admin_api.client.patch(f"/companies/{company}", json={"config": rest}, headers=ADMIN)
    assert answer.status_code == 409 and "synthetic" in answer.json()["error"]["message"]
    assert admin_api.client.get(f"/companies/{company}", headers=ADMIN).json()["config"] == {"seed": 3}


def openapi(api: Api) -> dict[str, Any]:
    document: dict[str, Any] = api.client.get("/openapi.json").json()
    return document


def test_every_operation_with_a_body_documents_400_and_413(admin_api: Api) -> None:
    with_body = [
        (path, method, operation)
        for path, item in openapi(admin_api)["paths"].items()
        for method, operation in item.items()
        if "requestBody" in operation
    ]
    assert {(path, method) for path, method, _ in with_body} >= {("/companies", "post"), ("/sync", "post")}
    for path, method, operation in with_body:
        assert {"400", "413", "422"} <= set(operation["responses"]), (method, path)


def test_the_document_uses_json_schema_keywords_only_and_configs_are_a_union_on_connector(admin_api: Api) -> None:
    document = openapi(admin_api)

    def keys(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                if key != "properties":
                    yield from keys(value)
                else:
                    for schema in value.values():
                        yield from keys(schema)
        elif isinstance(node, list):
            for item in node:
                yield from keys(item)

    assert not {"ge", "le", "gt", "lt"} & set(keys(document))
    body = document["paths"]["/companies"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "connector"
    assert set(body["discriminator"]["mapping"]) >= {"graphql", "rest", "synthetic"}
    schemas = document["components"]["schemas"]
    assert schemas["RestCompanyIn"]["properties"]["config"]["$ref"] == "#/components/schemas/RestConfig"
    assert "pattern" in schemas["RestConfig"]["properties"]["base_url"]

