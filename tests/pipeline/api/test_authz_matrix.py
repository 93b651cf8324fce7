"""The authorization matrix: every operation of ``/openapi.json`` × every credential × own, another
company's and a missing object.

The operations come from the document itself, so an endpoint added without an entry in ``MATRIX``
fails ``test_every_documented_operation_has_a_matrix_entry``. To add one, write an ``Entry``: how
to address an object (``own`` / ``foreign`` / ``missing``) and the status each credential gets for
its own object. For a tenant-scoped operation (``scoped=True``) the test then proves that another
company's object answers exactly like a missing one (status, body and headers) for every tenant
credential; for an admin-key operation, that the key reaches every company alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from sqlalchemy import Engine

from pipeline.control import cancel_job
from pipeline.planning import plan_job
from pipeline.settings import Settings
from storage.base import BlobStore
from tests.pipeline.api.conftest import Api, start_api
from tests.pipeline.api.helpers import employee_ids, publish_document, schedule_document

KEY = "matrix-admin-key-0123456789"
Target = Literal["own", "foreign", "missing"]
TENANT_ROLES = ("admin", "manager", "technician")
CREDENTIALS = (
    "none", "bad-bearer", "bad-key", "admin-key",
    *(f"{company}-{role}" for company in ("A", "B") for role in TENANT_ROLES),
)
MISSING_JOB = "00000000-0000-4000-8000-000000000000"
EXCLUSIVE = {"A": "2030-03-01", "B": "2030-03-02"}  # a partition only that company published


@dataclass
class Company:
    id: int
    employee: int
    pending_job: str
    finished_job: str
    retry_job: str


@dataclass
class World:
    api: Api
    companies: dict[str, Company]

    def headers(self, credential: str) -> dict[str, str]:
        if credential == "none":
            return {}
        if credential == "bad-bearer":
            return {"Authorization": "Bearer not-a-jwt"}
        if credential == "bad-key":
            return {"X-API-Key": KEY + "-wrong"}
        if credential == "admin-key":
            return {"X-API-Key": KEY}
        company, role = credential.split("-")
        own = self.companies[company]
        return self.api.headers(own.id, role, own.employee if role == "technician" else None)

    def owner(self, credential: str, target: Target) -> Company:
        """Whose object ``target`` is for this caller: its own company (A for non-tenant credentials) or the other."""
        mine = credential[0] if credential[0] in "AB" and credential[1] == "-" else "A"
        other = "B" if mine == "A" else "A"
        return self.companies[mine if target == "own" else other]


Request = tuple[str, str, dict[str, Any]]


@dataclass
class Entry:
    """How to call one operation, and what each credential gets for its own object."""

    request: Callable[[World, str, Target], Request | None]
    expect: dict[str, int]
    scoped: bool = False  # the object belongs to the caller's company (bearer tokens), not to the admin key
    targets: tuple[Target, ...] = ("own", "foreign", "missing")


def admin_only(success: int) -> dict[str, int]:
    """The admin key succeeds; no key, a wrong key or any bearer token (of any role) gets 401."""
    return {credential: (success if credential == "admin-key" else 401) for credential in CREDENTIALS}


def tenants(success: int) -> dict[str, int]:
    """Every tenant role's token succeeds; no token, a bad one or the admin key alone get 401."""
    return {credential: (success if credential[:2] in {"A-", "B-"} else 401) for credential in CREDENTIALS}


def sync_roles(success: int) -> dict[str, int]:
    """A company's admins and managers succeed, its technicians get 403, everyone else 401."""
    statuses = {}
    for credential in CREDENTIALS:
        tenant = credential[:2] in {"A-", "B-"}
        statuses[credential] = (success if credential[2:] in {"admin", "manager"} else 403) if tenant else 401
    return statuses


def tenant_job_url(suffix: str = "") -> Callable[[World, str, Target], Request]:
    return lambda world, credential, target: (
        "GET",
        f"/v1/jobs/{MISSING_JOB if target == 'missing' else world.owner(credential, target).finished_job}{suffix}",
        {},
    )


def partition_url(world: World, credential: str, target: Target) -> Request:
    if target == "missing":
        return "GET", "/v1/schedule/2099-12-31", {}
    owner = "A" if world.owner(credential, target) is world.companies["A"] else "B"
    return "GET", f"/v1/schedule/{EXCLUSIVE[owner]}", {}


def job_url(attribute: str, suffix: str = "", method: str = "GET") -> Callable[[World, str, Target], Request]:
    def request(world: World, credential: str, target: Target) -> Request:
        job = MISSING_JOB if target == "missing" else getattr(world.owner(credential, target), attribute)
        return method, f"/sync/jobs/{job}{suffix}", {}

    return request


def company_url(method: str, body: dict[str, Any] | None = None) -> Callable[[World, str, Target], Request]:
    def request(world: World, credential: str, target: Target) -> Request:
        company = 987654321 if target == "missing" else world.owner(credential, target).id
        return method, f"/companies/{company}", {} if body is None else {"json": body}

    return request


def no_object(method: str, path: str, **kwargs: Any) -> Callable[[World, str, Target], Request | None]:
    return lambda world, credential, target: (method, path, kwargs) if target == "own" else None


MATRIX: dict[tuple[str, str], Entry] = {
    ("GET", "/v1/{resource}"): Entry(no_object("GET", "/v1/schedule"), tenants(200), scoped=True, targets=("own",)),
    ("GET", "/v1/{resource}/{partition}"): Entry(partition_url, tenants(200), scoped=True),
    ("POST", "/v1/sync"): Entry(
        no_object("POST", "/v1/sync", json={"resources": ["users"]}), sync_roles(202), scoped=True, targets=("own",)
    ),
    ("GET", "/v1/jobs"): Entry(no_object("GET", "/v1/jobs"), sync_roles(200), scoped=True, targets=("own",)),
    ("GET", "/v1/jobs/{job_id}"): Entry(tenant_job_url(), sync_roles(200), scoped=True),
    ("GET", "/v1/jobs/{job_id}/events"): Entry(tenant_job_url("/events"), sync_roles(200), scoped=True),
    ("GET", "/healthz"): Entry(no_object("GET", "/healthz"), dict.fromkeys(CREDENTIALS, 200), targets=("own",)),
    ("POST", "/sync"): Entry(
        lambda world, credential, target: (
            "POST", "/sync",
            {"json": {"company_ids": [987654321 if target == "missing" else world.owner(credential, target).id],
                      "resources": ["users"]}},
        ),
        admin_only(202),
    ),
    ("GET", "/sync/jobs"): Entry(no_object("GET", "/sync/jobs"), admin_only(200), targets=("own",)),
    ("GET", "/sync/jobs/{job_id}"): Entry(job_url("finished_job"), admin_only(200)),
    ("GET", "/sync/jobs/{job_id}/logs"): Entry(job_url("finished_job", "/logs"), admin_only(200)),
    ("GET", "/sync/jobs/{job_id}/events"): Entry(job_url("finished_job", "/events"), admin_only(200)),
    ("POST", "/sync/jobs/{job_id}/cancel"): Entry(job_url("pending_job", "/cancel", "POST"), admin_only(200)),
    ("POST", "/sync/jobs/{job_id}/retry"): Entry(job_url("retry_job", "/retry", "POST"), admin_only(202)),
    ("GET", "/companies"): Entry(no_object("GET", "/companies"), admin_only(200), targets=("own",)),
    ("POST", "/companies"): Entry(
        no_object("POST", "/companies", json={"name": "matrix", "connector": "synthetic"}),
        admin_only(201),
        targets=("own",),
    ),
    ("GET", "/companies/{company_id}"): Entry(company_url("GET"), admin_only(200)),
    ("PATCH", "/companies/{company_id}"): Entry(company_url("PATCH", {"toggles": {}}), admin_only(200)),
}


@pytest.fixture
def world(api_settings: Settings, api_engine: Engine, local_store: BlobStore) -> Iterator[World]:
    settings = api_settings.model_copy(update={"admin_api_key": KEY, "max_unfinished_jobs": 50})
    for api in start_api(settings, api_engine, local_store):
        companies = {}
        for name in ("A", "B"):
            tenant = api.add_tenant()
            publish_document(
                api.engine, api.store, company_id=tenant.id, resource="schedule", partition=EXCLUSIVE[name],
                document=schedule_document(tenant.id, EXCLUSIVE[name]),
            )
            jobs = []
            # Two cancelled jobs of one resource, then the pending one of another: a plan skips (and a
            # retry leaves) a partition with an open task.
            for resource in ("users", "users", "schedule"):
                planned = plan_job(api.engine, None, trigger="api", company_ids=[tenant.id], resources=[resource])
                assert planned is not None and planned.task_ids
                jobs.append(str(planned.job_id))
                if len(jobs) < 3:
                    cancel_job(api.engine, job_id=planned.job_id)
            companies[name] = Company(tenant.id, employee_ids(tenant.schedule)[0], jobs[2], jobs[0], jobs[1])
        yield World(api, companies)


def documented_operations(api: Api) -> set[tuple[str, str]]:
    paths = api.client.get("/openapi.json").json()["paths"]
    return {(method.upper(), path) for path, item in paths.items() for method in item}


def test_every_documented_operation_has_a_matrix_entry_and_every_entry_an_operation(world: World) -> None:
    documented = documented_operations(world.api)
    assert documented - set(MATRIX) == set(), "operations without an authorization matrix entry"
    assert set(MATRIX) - documented == set(), "matrix entries for operations the document no longer has"
    for key, entry in MATRIX.items():
        assert set(entry.expect) == set(CREDENTIALS), key


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def call(world: World, credential: str, request: Request) -> Answer:
    method, url, kwargs = request
    response = world.api.client.request(method, url, headers=world.headers(credential), **kwargs)
    headers = {name: value for name, value in response.headers.items() if name not in {"date", "content-length"}}
    return Answer(response.status_code, response.content, headers)


@pytest.mark.parametrize("operation", list(MATRIX), ids=[f"{method} {path}" for method, path in MATRIX])
def test_each_credential_gets_what_the_matrix_says_and_a_foreign_object_answers_like_a_missing_one(
    world: World, operation: tuple[str, str]
) -> None:
    entry = MATRIX[operation]
    for credential in CREDENTIALS:
        answers: dict[Target, Answer] = {}
        for target in entry.targets:
            request = entry.request(world, credential, target)
            if request is not None:
                answers[target] = call(world, credential, request)
        own = answers["own"]
        expected = entry.expect[credential]
        assert own.status == expected, (credential, own.status, own.body[:300])
        if own.status >= 400:
            assert own.headers["content-type"] == "application/json", credential
            assert b'"error"' in own.body, credential
        if "missing" in answers and expected < 400:
            assert answers["missing"].status == 404, (credential, answers["missing"].body[:300])
        if "foreign" not in answers:
            continue
        foreign = answers["foreign"]
        if entry.scoped and credential[:2] in {"A-", "B-"}:
            # Another tenant's object is indistinguishable from one that does not exist.
            assert (foreign.status, foreign.body, foreign.headers) == (
                answers["missing"].status, answers["missing"].body, answers["missing"].headers
            ), credential
        else:
            assert foreign.status == own.status, (credential, foreign.status, foreign.body[:300])


def test_a_tenants_listing_never_names_another_tenants_partition(world: World) -> None:
    for mine, other in (("A", "B"), ("B", "A")):
        for role in TENANT_ROLES:
            listed = world.api.client.get("/v1/schedule", headers=world.headers(f"{mine}-{role}")).json()
            partitions = {item["partition"] for item in listed}
            assert EXCLUSIVE[mine] in partitions and EXCLUSIVE[other] not in partitions, (mine, role)
