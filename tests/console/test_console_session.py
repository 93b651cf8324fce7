"""Console sessions over plain HTTP: the cookie's flags, CSRF on every state-changing request,
forged or revoked sessions, and the console's absence from the OpenAPI schema."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from actors.tasks import Actors
from pipeline.auth import issue_token
from pipeline.console.session import COOKIE
from pipeline.models import JOBS
from pipeline.runtime import Runtime
from tests.integration.control_helpers import ADMIN_KEY, add_synthetic, control_app, control_runtime


@pytest.fixture
def rt(stack: Runtime) -> Runtime:
    return control_runtime(stack)


@pytest.fixture
def client(rt: Runtime, actors: Actors) -> Iterator[TestClient]:
    with TestClient(control_app(rt, actors), base_url="http://127.0.0.1") as client:
        yield client


def log_in(client: TestClient, **field: str) -> str:
    """Log in with ``admin_key=`` or ``token=``; returns the session's CSRF token."""
    form = client.get("/console/login").text
    login_csrf = re.search(r'name="csrf" value="([^"]+)"', form)
    assert login_csrf
    answer = client.post("/console/login", data={"csrf": login_csrf.group(1), **field}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    page = client.get("/console/jobs").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf
    return csrf.group(1)


def count_jobs(rt: Runtime) -> int:
    with rt.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(JOBS)).scalar_one())


def test_the_session_cookie_is_httponly_samesite_strict_and_never_holds_the_admin_key(
    client: TestClient,
) -> None:
    form = client.get("/console/login").text
    token = re.search(r'name="csrf" value="([^"]+)"', form)
    assert token
    answer = client.post("/console/login", data={"csrf": token.group(1), "admin_key": ADMIN_KEY},
                         follow_redirects=False)
    cookie = next(h for h in answer.headers.get_list("set-cookie") if h.startswith(f"{COOKIE}="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert ADMIN_KEY not in cookie


def test_a_state_changing_request_without_the_sessions_csrf_token_is_refused_and_changes_nothing(
    client: TestClient, rt: Runtime
) -> None:
    company = add_synthetic(rt, "acme", days_ahead=1)
    csrf = log_in(client, admin_key=ADMIN_KEY)
    for data in ({}, {"csrf": "forged"}):
        refused = client.post(f"/console/companies/{company}/sync", data=data, follow_redirects=False)
        assert refused.status_code == 403 and "CSRF" in refused.text
    assert count_jobs(rt) == 0
    accepted = client.post(f"/console/companies/{company}/sync", data={"csrf": csrf}, follow_redirects=False)
    assert accepted.status_code == 303 and accepted.headers["location"].startswith("/console/jobs/")
    via_header = client.post(f"/console/companies/{company}/sync", headers={"X-CSRF-Token": csrf},
                             follow_redirects=False)
    assert via_header.status_code == 303
    assert count_jobs(rt) == 2
    assert client.post("/console/logout", data={}, follow_redirects=False).status_code == 403
    assert client.post("/console/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    assert client.get("/console/jobs", follow_redirects=False).headers["location"] == "/console/login"


def test_a_login_without_the_forms_csrf_token_is_refused(client: TestClient) -> None:
    client.get("/console/login")
    answer = client.post("/console/login", data={"csrf": "guess", "admin_key": ADMIN_KEY}, follow_redirects=False)
    assert answer.status_code == 401 and "the login form expired" in answer.text
    assert not [h for h in answer.headers.get_list("set-cookie") if h.startswith(f"{COOKIE}=")]


def test_forged_foreign_and_revoked_sessions_are_sent_to_the_login_page(
    client: TestClient, rt: Runtime, actors: Actors
) -> None:
    log_in(client, admin_key=ADMIN_KEY)
    session = client.cookies.get(COOKIE)
    assert session
    assert client.get("/console/jobs", follow_redirects=False).status_code == 200
    read_token = issue_token(rt.settings, company_id=1, role="admin")
    for value in (session[:-4] + "AAAA", read_token):
        client.cookies.clear()
        client.cookies.set(COOKIE, value, domain="127.0.0.1", path="/console")
        assert client.get("/console/jobs", follow_redirects=False).headers["location"] == "/console/login"
    client.cookies.clear()
    client.cookies.set(COOKIE, session, domain="127.0.0.1", path="/console")
    assert client.get("/console/jobs", follow_redirects=False).status_code == 200, "the genuine cookie still works"

    rotated = control_runtime(rt, admin_api_key="a-new-admin-key-after-rotation")
    with TestClient(control_app(rotated, actors), base_url="http://127.0.0.1") as other:
        other.cookies.set(COOKIE, session, domain="127.0.0.1", path="/console")
        assert other.get("/console/jobs", follow_redirects=False).headers["location"] == "/console/login"


def test_a_manager_session_cannot_reach_another_companys_pages_or_change_toggles(
    client: TestClient, rt: Runtime
) -> None:
    mine = add_synthetic(rt, "mine", days_ahead=1)
    theirs = add_synthetic(rt, "theirs", days_ahead=1)
    csrf = log_in(client, token=issue_token(rt.settings, company_id=mine, role="manager"))
    assert client.post(f"/console/companies/{theirs}/sync", data={"csrf": csrf}).status_code == 404
    answer = client.post(f"/console/companies/{mine}/toggles",
                         data={"csrf": csrf, "known": "TechDashboard_DisplayBillRate"}, follow_redirects=False)
    assert "only+an+operator" in answer.headers["location"]
    assert count_jobs(rt) == 0


def test_console_routes_are_not_in_the_openapi_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/console")]
    assert {"/v1/sync", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events"} <= set(paths)


