"""The control API over HTTP: the admin key, request validation naming the field, companies,
job lookups, and the embedded mode (no broker: an in-process worker, a polling event feed)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import Engine

from pipeline.api import create_app
from pipeline.companies import add_company
from pipeline.db import make_engine
from pipeline.migrate import upgrade
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from storage.base import BlobStore
from storage.local import LocalBlobStore
from tests.pipeline.api.conftest import Api, start_api
from tests.pipeline.api.helpers import ISSUER, SECRET
from tests.services import wait_for

KEY = "unit-admin-key"
ADMIN = {"X-API-Key": KEY}


@pytest.fixture
def admin_api(api_settings: Settings, api_engine: Engine, local_store: BlobStore) -> Iterator[Api]:
    yield from start_api(api_settings.model_copy(update={"admin_api_key": KEY}), api_engine, local_store)


def error(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return str(body["error"]["message"])


def synthetic(api: Api, **config: Any) -> int:
    return add_company(api.engine, name="control", connector="synthetic", config=config).id


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/sync"), ("GET", "/sync/jobs"), ("GET", f"/sync/jobs/{uuid.uuid4()}"), ("GET", "/companies"),
    ("POST", f"/sync/jobs/{uuid.uuid4()}/cancel"),
])
def test_control_endpoints_answer_503_naming_the_setting_when_no_admin_key_is_configured(
    api: Api, method: str, path: str
) -> None:
    answer = api.client.request(method, path, headers=ADMIN, json={})
    assert answer.status_code == 503
    assert "PIPELINE_ADMIN_API_KEY" in error(answer)
    assert "/sync" not in api.client.get("/openapi.json").json()["paths"], "a disabled API is not advertised"


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": ""}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY + "x"}])
def test_a_missing_or_wrong_admin_key_gets_401(admin_api: Api, headers: dict[str, str]) -> None:
    for method, path in (("POST", "/sync"), ("GET", "/sync/jobs"), ("GET", "/companies"),
                         ("GET", f"/sync/jobs/{uuid.uuid4()}/events")):
        answer = admin_api.client.request(method, path, headers=headers, json={})
        assert answer.status_code == 401, (method, path)
        assert error(answer) in {"missing X-API-Key header", "invalid API key"}
        assert answer.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(("body", "named"), [
    ({"mode": "fast"}, "mode"),
    ({"priority": "urgent"}, "priority"),
    ({"company_ids": ["x"]}, "company_ids"),
    ({"company_ids": [0]}, "company_ids"),
    ({"company_ids": 5}, "company_ids"),
    ({"resources": [""]}, "resources"),
    ({"partitions": ["x" * 201]}, "partitions"),
    ({"companies": [1]}, "companies"),
    ([1, 2], "body"),
])
def test_a_bad_sync_body_gets_422_naming_the_field(admin_api: Api, body: Any, named: str) -> None:
    answer = admin_api.client.post("/sync", json=body, headers=ADMIN)
    assert answer.status_code == 422
    assert named in error(answer)


def test_malformed_json_gets_422(admin_api: Api) -> None:
    answer = admin_api.client.post("/sync", content=b"{not json", headers={**ADMIN, "Content-Type": "application/json"})
    assert answer.status_code == 422 and error(answer)


def test_an_unknown_company_gets_404_and_a_resource_it_does_not_offer_409_naming_them(admin_api: Api) -> None:
    # The body is schema-valid; what it names does not exist (404) or cannot be synced (409), not a 422.
    company = synthetic(admin_api, days_ahead=1)
    unknown = admin_api.client.post("/sync", json={"company_ids": [company, 987654321]}, headers=ADMIN)
    assert unknown.status_code == 404 and "987654321" in error(unknown)
    assert unknown.json()["error"]["code"] == "unknown_company"
    resource = admin_api.client.post("/sync", json={"company_ids": [company], "resources": ["invoices"]},
                                     headers=ADMIN)
    assert resource.status_code == 409 and "invoices" in error(resource)


def test_companies_are_created_listed_and_patched_with_the_clis_validation(admin_api: Api) -> None:
    client = admin_api.client
    bad_config = client.post("/companies", json={"name": "Acme", "connector": "synthetic",
                                                 "config": {"jobs_per_dya": 3}}, headers=ADMIN)
    assert bad_config.status_code == 422 and "jobs_per_dya" in error(bad_config)
    bad_connector = client.post("/companies", json={"name": "Acme", "connector": "soap"}, headers=ADMIN)
    assert bad_connector.status_code == 422 and "soap" in error(bad_connector)
    bad_toggle = client.post("/companies", json={"name": "Acme", "connector": "synthetic",
                                                 "toggles": {"TechDashboard_HideDiscounts": "yes"}}, headers=ADMIN)
    assert bad_toggle.status_code == 422 and "TechDashboard_HideDiscounts" in error(bad_toggle)
    assert client.post("/companies", json={"connector": "synthetic"}, headers=ADMIN).status_code == 422

    created = client.post("/companies", json={"name": " Acme ", "connector": "synthetic", "config": {"seed": 4},
                                              "external_id": f"ext-{uuid.uuid4()}"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    company = created.json()
    assert company["name"] == "Acme" and company["config"] == {"seed": 4} and company["enabled"] is True
    duplicate = client.post("/companies", json={"name": "Again", "connector": "synthetic",
                                                "external_id": company["external_id"]}, headers=ADMIN)
    assert duplicate.status_code == 409 and "already exists" in error(duplicate)
    assert company["id"] in [c["id"] for c in client.get("/companies", headers=ADMIN).json()]

    patched = client.patch(f"/companies/{company['id']}", json={"toggles": {"TechDashboard_HideDiscounts": True},
                                                                "enabled": False}, headers=ADMIN)
    assert patched.status_code == 200
    assert patched.json()["toggles"] == {"TechDashboard_HideDiscounts": True} and patched.json()["enabled"] is False
    assert patched.json()["config"] == {"seed": 4}, "fields not given stay as they were"
    disabled = client.post("/sync", json={"company_ids": [company["id"]]}, headers=ADMIN)
    assert disabled.status_code == 409 and "disabled" in error(disabled)
    bad_patch = client.patch(f"/companies/{company['id']}", json={"config": {"days_ahead": 0}}, headers=ADMIN)
    assert bad_patch.status_code == 422 and "days_ahead" in error(bad_patch)
    assert client.get(f"/companies/{company['id']}", headers=ADMIN).json()["config"] == {"seed": 4}
    assert client.patch("/companies/987654321", json={"enabled": True}, headers=ADMIN).status_code == 404
    assert client.patch(f"/companies/{company['id']}", json={"colour": "red"}, headers=ADMIN).status_code == 422
    assert client.get("/companies/abc", headers=ADMIN).status_code == 422


@pytest.mark.parametrize("suffix", ["", "/logs", "/events"])
def test_an_unknown_job_is_404_and_a_malformed_id_422_never_5xx(admin_api: Api, suffix: str) -> None:
    unknown = admin_api.client.get(f"/sync/jobs/{uuid.uuid4()}{suffix}", headers=ADMIN)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    malformed = admin_api.client.get(f"/sync/jobs/not-a-uuid{suffix}", headers=ADMIN)
    assert malformed.status_code == 422 and "job_id" in error(malformed)
    for action in ("cancel", "retry"):
        assert admin_api.client.post(f"/sync/jobs/{uuid.uuid4()}/{action}", headers=ADMIN).status_code == 404
        assert admin_api.client.post(f"/sync/jobs/123/{action}", headers=ADMIN).status_code == 422


@pytest.mark.parametrize("query", [{"status": "done"}, {"limit": 0}, {"limit": 5000}, {"company_id": "x"}])
def test_a_bad_job_listing_query_gets_422_naming_it(admin_api: Api, query: dict[str, Any]) -> None:
    answer = admin_api.client.get("/sync/jobs", params=query, headers=ADMIN)
    assert answer.status_code == 422 and next(iter(query)) in error(answer)


def test_a_sync_on_the_embedded_default_runs_in_process_and_streams_events_by_polling(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    upgrade(url)
    engine = make_engine(url)
    runtime = Runtime(
        settings=Settings(database_url=url, blob_url=(tmp_path / "blobs").as_uri(), jwt_secret=SECRET,
                          jwt_issuer=ISSUER, admin_api_key=KEY, worker_threads=2, retry_min_backoff_ms=10),
        engine=engine, store=LocalBlobStore(tmp_path / "blobs"),
    )
    company = add_company(engine, name="embedded", connector="synthetic", config={"days_ahead": 2}).id
    try:
        with TestClient(create_app(runtime), headers=ADMIN) as client:
            answer = client.post("/sync", json={"company_ids": [company], "mode": "full"})
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["job_id"]
            stream = client.get(answer.json()["events_url"])  # ends with the job
            wait_for(lambda: client.get(f"/sync/jobs/{job_id}").json()["status"] == "completed", timeout=30,
                     what="the in-process worker to finish the job")
            listed = client.get("/sync/jobs", params={"company_id": company}).json()
            other = client.get("/sync/jobs", params={"company_id": company + 1}).json()
    finally:
        engine.dispose()
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [(block.split("\n")[1].removeprefix("event: "), orjson.loads(block.split("\n")[2][len("data: "):]))
              for block in stream.text.strip().split("\n\n") if block.startswith("id:")]
    assert events[0][0] == "snapshot" and events[-1] == ("end", events[-1][1])
    assert events[-1][1]["status"] == "completed" and events[-1][1]["progress"]["percent"] == 100
    assert {data["status"] for name, data in events if name == "task"} <= {"processing", "completed"}
    assert [job["id"] for job in listed] == [job_id] and other == []


def graphql_body(body: Any) -> bool:
    """A company body (or patch) carrying a graphql config."""
    if not isinstance(body, dict):
        return False
    config = body.get("config")
    return body.get("connector") == "graphql" or (isinstance(config, dict) and "endpoint" in config)


def test_the_control_api_accepts_what_its_schema_allows_and_never_answers_5xx(admin_api: Api) -> None:
    # In-process and quick; tests/pipeline/api/test_contract.py runs the CLI with every check and phase.
    schema = schemathesis.openapi.from_asgi("/openapi.json", admin_api.app)
    control = schema.include(path_regex="^/(sync|companies)")
    statuses: list[int] = []

    @given(case=control.as_strategy())
    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        # Connector configs are described in the schema (a union on `connector`), so schema-valid
        # bodies are accepted: positive_data_acceptance holds too — except for graphql configs,
        # whose `query` must parse as GraphQL, which no JSON Schema can state.
        excluded = [positive_data_acceptance] if graphql_body(case.body) else []
        response = case.call_and_validate(headers=ADMIN, excluded_checks=excluded)
        statuses.append(response.status_code)

    check()
    assert not [status for status in statuses if status >= 500]
    assert [status for status in statuses if status < 300], statuses
