"""The read API on PostgreSQL and real blob stores: roles, toggles, tenants, caching, integrity."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from httpx2 import Response

from pipeline.api import create_app
from pipeline.companies import update_company
from pipeline.db import make_engine
from pipeline.runtime import Runtime
from storage.local import LocalBlobStore
from tests.pipeline.api.conftest import Api, Tenant
from tests.pipeline.api.helpers import (
    ALL_HIDDEN,
    ALL_SHOWN,
    HIDING_VALUE,
    PARTITION,
    TOGGLE_PATHS,
    employee_ids,
    jobs_of,
    publish_document,
    schedule_document,
)

DOCUMENT = f"/v1/schedule/{PARTITION}"
ROLES = ("admin", "manager", "technician")
TOGGLE_CASES: dict[str, dict[str, bool]] = {
    **{f"hide-{TOGGLE_PATHS[name]}": {name: value} for name, value in HIDING_VALUE.items()},
    "all-hidden": ALL_HIDDEN,
    "all-shown": ALL_SHOWN,
    "unset": {},
}


def poll(condition: Callable[[], bool], *, timeout: float, what: str) -> float:
    """Call ``condition`` until it holds; return the seconds it took, fail after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def has_path(job: dict[str, Any], path: str) -> bool:
    head, _, rest = path.partition(".")
    if head not in job:
        return False
    return has_path(job[head], rest) if rest else True


def get(api: Api, path: str, company_id: int, role: str, employee_id: Any = None, **headers: str) -> Response:
    return api.client.get(path, headers={**api.headers(company_id, role, employee_id), **headers})


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("toggles", list(TOGGLE_CASES.values()), ids=list(TOGGLE_CASES))
def test_every_role_and_toggle_combination(api: Api, role: str, toggles: dict[str, bool]) -> None:
    tenant = api.add_tenant(toggles)
    employee = employee_ids(tenant.schedule)[0]
    response = get(api, DOCUMENT, tenant.id, role, employee if role == "technician" else None)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    if role != "technician":
        assert body == tenant.schedule
        return
    assert [job["id"] for job in body["jobs"]] == jobs_of(tenant.schedule, employee)
    assert body["counts"]["jobs"] == len(body["jobs"]) > 0
    hidden_by_toggles = {TOGGLE_PATHS[name] for name, value in toggles.items() if value == HIDING_VALUE[name]}
    for job in body["jobs"]:
        assert "internalMemo" not in job and "accessInformation" not in job
        for path in TOGGLE_PATHS.values():
            assert has_path(job, path) == (path not in hidden_by_toggles), path
        if {"contactInfo.phone", "contactInfo.email"} <= hidden_by_toggles:
            assert "contactInfo" not in job
    for path in hidden_by_toggles | {"internalMemo", "accessInformation"}:
        # Absent, not null: the key itself never appears in the bytes.
        assert f'"{path.rpartition(".")[2]}":'.encode() not in response.content, path


def test_a_technician_token_with_a_string_employee_id_matches_integer_ids(api: Api) -> None:
    tenant = api.add_tenant()
    for employee in employee_ids(tenant.schedule)[:3]:
        body = get(api, DOCUMENT, tenant.id, "technician", str(employee)).json()
        assert [job["id"] for job in body["jobs"]] == jobs_of(tenant.schedule, employee)
        assert all(
            any(entry["EmployeeInformationId"] == employee for entry in job["employeeSchedules"])
            for job in body["jobs"]
        )


def test_a_technician_on_no_job_gets_an_empty_schedule(api: Api) -> None:
    tenant = api.add_tenant()
    body = get(api, DOCUMENT, tenant.id, "technician", "424242").json()
    assert body["jobs"] == [] and body["employees"] == [] and body["counts"]["jobs"] == 0


def test_listing_shows_the_callers_partitions_with_their_metadata(api: Api) -> None:
    tenant = api.add_tenant()
    extra = schedule_document(tenant.id, "2030-01-16", jobs=3)
    publish_document(
        api.engine, api.store, company_id=tenant.id, resource="schedule", partition="2030-01-16", document=extra
    )
    response = get(api, "/v1/schedule", tenant.id, "manager")
    assert response.status_code == 200
    listing = response.json()
    assert [item["partition"] for item in listing] == [PARTITION, "2030-01-16"]
    assert [item["record_count"] for item in listing] == [50, 3]
    assert set(listing[0]) == {"partition", "record_count", "synced_at", "changed_at", "checksum"}
    assert len(listing[0]["checksum"]) == 64


def test_a_technicians_listing_counts_only_their_jobs(api: Api) -> None:
    tenant = api.add_tenant()
    employee = employee_ids(tenant.schedule)[0]
    listing = get(api, "/v1/schedule", tenant.id, "technician", employee).json()
    assert listing[0]["record_count"] == len(jobs_of(tenant.schedule, employee)) < 50


def assert_same_answer(first: Response, second: Response) -> None:
    assert (first.status_code, first.content, dict(first.headers)) == (
        second.status_code,
        second.content,
        dict(second.headers),
    )


def test_another_companys_partition_answers_exactly_like_a_missing_one(api: Api) -> None:
    company_a, company_b = api.add_tenant(), api.add_tenant()
    only_b = schedule_document(company_b.id, "2030-02-01", jobs=5)
    publish_document(
        api.engine,
        api.store,
        company_id=company_b.id,
        resource="schedule",
        partition="2030-02-01",
        document=only_b,
    )
    for role, employee in (("admin", None), ("manager", None), ("technician", 1000)):
        missing = get(api, "/v1/schedule/2031-12-31", company_a.id, role, employee)
        assert missing.status_code == 404
        assert missing.json() == {"error": {"code": "not_found", "message": "not found"}}
        for path in ("/v1/schedule/2030-02-01", "/v1/nonexistent/2030-02-01", "/v1/nonexistent/x"):
            assert_same_answer(get(api, path, company_a.id, role, employee), missing)
        assert_same_answer(get(api, "/v1/nonexistent", company_a.id, role, employee), missing)
        # A's listing is A's alone: B's partitions are not in it, as if B did not exist.
        listing = get(api, "/v1/schedule", company_a.id, role, employee).json()
        assert [item["partition"] for item in listing] == [PARTITION]
        assert all(
            item["checksum"] != other["checksum"]
            for item in listing
            for other in get(api, "/v1/schedule", company_b.id, "manager").json()
        )
        # B's own document at the shared partition key is not what A gets.
        assert get(api, DOCUMENT, company_a.id, "manager").json()["company_id"] == company_a.id


def test_a_token_for_a_company_that_does_not_exist_gets_the_same_404(api: Api) -> None:
    tenant = api.add_tenant()
    missing = get(api, "/v1/schedule/2031-12-31", tenant.id, "manager")
    assert_same_answer(get(api, DOCUMENT, 987654321, "manager"), missing)
    assert_same_answer(get(api, "/v1/schedule", 987654321, "manager"), missing)


@pytest.mark.parametrize("partition", ["x" * 201, "%00", "a%00b"])
def test_partition_keys_that_cannot_exist_get_the_same_404(api: Api, partition: str) -> None:
    tenant = api.add_tenant()
    missing = get(api, "/v1/schedule/2031-12-31", tenant.id, "manager")
    assert_same_answer(get(api, f"/v1/schedule/{partition}", tenant.id, "manager"), missing)


def test_etag_and_cache_control_then_304_for_a_current_etag(api: Api) -> None:
    tenant = api.add_tenant()
    first = get(api, DOCUMENT, tenant.id, "manager")
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 10
    assert first.headers["cache-control"] == "private, max-age=300"
    for value in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        again = get(api, DOCUMENT, tenant.id, "manager", **{"If-None-Match": value})
        assert again.status_code == 304, value
        assert again.content == b""
        assert again.headers["etag"] == etag
        assert again.headers["cache-control"] == "private, max-age=300"
    stale = get(api, DOCUMENT, tenant.id, "manager", **{"If-None-Match": '"stale"'})
    assert stale.status_code == 200 and stale.content == first.content


def test_the_etag_differs_per_view_and_changes_with_toggles(api: Api) -> None:
    tenant = api.add_tenant()
    first, second = employee_ids(tenant.schedule)[:2]
    manager = get(api, DOCUMENT, tenant.id, "manager").headers["etag"]
    admin = get(api, DOCUMENT, tenant.id, "admin").headers["etag"]
    tech_1 = get(api, DOCUMENT, tenant.id, "technician", first).headers["etag"]
    tech_2 = get(api, DOCUMENT, tenant.id, "technician", second).headers["etag"]
    assert manager == admin  # the same bytes: the same view
    assert len({manager, tech_1, tech_2}) == 3
    update_company(api.engine, tenant.id, toggles={"TechDashboard_DisplayBillRate": False})
    poll(
        lambda: get(api, DOCUMENT, tenant.id, "technician", first).headers["etag"] != tech_1,
        timeout=5,
        what="the technician's ETag changing with the toggles",
    )
    assert get(api, DOCUMENT, tenant.id, "manager").headers["etag"] == manager


def test_a_toggle_change_takes_effect_within_five_seconds(api: Api) -> None:
    tenant = api.add_tenant()
    employee = employee_ids(tenant.schedule)[0]

    def jobs() -> list[dict[str, Any]]:
        response = get(api, DOCUMENT, tenant.id, "technician", employee)
        assert response.status_code == 200
        jobs: list[dict[str, Any]] = response.json()["jobs"]
        return jobs

    assert all("billRate" in job and "discounts" in job for job in jobs())
    update_company(
        api.engine, tenant.id, toggles={"TechDashboard_DisplayBillRate": False, "TechDashboard_HideDiscounts": True}
    )
    took = poll(
        lambda: all("billRate" not in job and "discounts" not in job for job in jobs()),
        timeout=5,
        what="billRate and discounts disappearing after the toggles changed",
    )
    assert took < 5
    update_company(api.engine, tenant.id, toggles={})
    poll(lambda: all("billRate" in job for job in jobs()), timeout=5, what="billRate coming back")


def test_a_new_version_is_served_with_a_new_etag(api: Api) -> None:
    tenant = api.add_tenant()
    before = get(api, DOCUMENT, tenant.id, "manager")
    newer = schedule_document(tenant.id, jobs=7)
    publish_document(
        api.engine, api.store, company_id=tenant.id, resource="schedule", partition=PARTITION, document=newer
    )
    poll(
        lambda: get(api, DOCUMENT, tenant.id, "manager").json() == newer,
        timeout=5,
        what="the new version being served",
    )
    assert get(api, DOCUMENT, tenant.id, "manager").headers["etag"] != before.headers["etag"]


def tamper(api: Api, tenant: Tenant) -> bytes:
    """Overwrite the published object's bytes behind the API's back; return the new bytes."""
    (dataset,) = [d for d in get(api, "/v1/schedule", tenant.id, "manager").json() if d["partition"] == PARTITION]
    key = f"{tenant.id}/schedule/{PARTITION}/{dataset['checksum']}.json"
    forged = orjson.dumps({**tenant.schedule, "jobs": [], "forged": "TAMPERED-MARKER"})
    api.store.put(key, forged)
    return forged


@pytest.mark.parametrize(("role", "employee"), [("manager", None), ("technician", 1000)])
def test_tampered_bytes_answer_502_and_are_never_served(
    api: Api, role: str, employee: Any, caplog: pytest.LogCaptureFixture
) -> None:
    tenant = api.add_tenant()
    tamper(api, tenant)
    with caplog.at_level(logging.ERROR, logger="pipeline.api"):
        response = get(api, DOCUMENT, tenant.id, role, employee)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "checksum_mismatch"
    assert b"TAMPERED-MARKER" not in response.content
    assert any("hashes to sha256" in record.getMessage() for record in caplog.records)
    again = get(api, DOCUMENT, tenant.id, role, employee)
    assert again.status_code == 502, "bad bytes must not have been cached"


def test_healthz_reports_ok_when_database_and_store_answer(api: Api) -> None:
    response = api.client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["checks"] == {"database": "ok", "store": "ok"}


def test_healthz_names_the_blob_store_when_it_is_unreachable(api: Api, tmp_path: Any) -> None:
    broken = LocalBlobStore(tmp_path / "gone")
    (tmp_path / "gone").rmdir()
    runtime = Runtime(settings=api.settings, engine=api.engine, store=broken)
    with TestClient(create_app(runtime)) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["store"] != "ok" and body["checks"]["database"] == "ok"
    assert "store" in body["error"]["message"]


def test_healthz_names_the_database_when_it_is_unreachable(api: Api) -> None:
    engine = make_engine("postgresql://nobody@127.0.0.1:1/none", pool_pre_ping=False)
    runtime = Runtime(settings=api.settings, engine=engine, store=api.store)
    try:
        with TestClient(create_app(runtime)) as client:
            response = client.get("/healthz")
    finally:
        engine.dispose()
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"] != "ok" and body["checks"]["store"] == "ok"
    assert "database" in body["error"]["message"]
    assert "nobody" not in response.text  # no connection details leak


def test_errors_are_json_naming_the_problem(api: Api) -> None:
    extra = APIRouter()

    @extra.get("/test/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    @extra.get("/test/typed")
    async def typed(limit: int) -> dict[str, int]:
        return {"limit": limit}

    app: FastAPI = api.app
    app.include_router(extra)
    with TestClient(app, raise_server_exceptions=False) as client:
        crash = client.get("/test/boom")
        invalid = client.get("/test/typed", params={"limit": "many"})
        unknown = client.get("/nowhere")
        wrong_method = client.post("/healthz")
    assert crash.status_code == 500
    assert crash.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
    assert invalid.status_code == 422
    assert invalid.json()["error"]["code"] == "invalid_request"
    assert "query parameter 'limit'" in invalid.json()["error"]["message"]
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_openapi_and_docs_are_served(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    assert {"/v1/{resource}", "/v1/{resource}/{partition}", "/healthz"} <= set(schema["paths"])
    assert api.client.get("/docs").status_code == 200


@pytest.mark.parametrize(("role", "employee"), [("manager", None), ("technician", 1000)])
def test_reads_and_integrity_checks_work_on_every_blob_store(api_on_each_store: Api, role: str, employee: Any) -> None:
    api = api_on_each_store
    tenant = api.add_tenant({"TechDashboard_DisplayCustomerEmails": False})
    response = get(api, DOCUMENT, tenant.id, role, employee)
    assert response.status_code == 200
    body = response.json()
    if role == "manager":
        assert body == tenant.schedule
    else:
        assert [job["id"] for job in body["jobs"]] == jobs_of(tenant.schedule, employee) != []
        assert all("email" not in job["contactInfo"] for job in body["jobs"])
    assert api.client.get("/healthz").json()["checks"] == {"database": "ok", "store": "ok"}
    other = api.add_tenant()
    tamper(api, other)
    tampered = get(api, DOCUMENT, other.id, role, employee)
    assert tampered.status_code == 502 and b"TAMPERED-MARKER" not in tampered.content
