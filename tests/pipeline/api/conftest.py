"""Fixtures for the read API: a migrated PostgreSQL database, real blob stores, two tenants."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from pipeline.api import create_app
from pipeline.auth import issue_token
from pipeline.companies import add_company
from pipeline.db import make_engine
from pipeline.migrate import upgrade
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from storage.base import BlobStore
from storage.local import LocalBlobStore
from tests.pipeline.api.helpers import ISSUER, PARTITION, SECRET, publish_document, schedule_document


@pytest.fixture(scope="session")
def api_database_url(make_database: Callable[[], str]) -> str:
    """A database of its own for the API tests, migrated to the newest schema."""
    url = make_database()
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def api_engine(api_database_url: str) -> Iterator[Engine]:
    engine = make_engine(api_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def api_settings(api_database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=api_database_url,
        blob_url=(tmp_path / "blobs").as_uri(),
        jwt_secret=SECRET,
        jwt_issuer=ISSUER,
        broker_url=None,
        s3_endpoint=None,
    )


@pytest.fixture
def local_store(tmp_path: Path) -> BlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@dataclass
class Tenant:
    """A company with a published schedule partition and a users partition."""

    id: int
    schedule: dict[str, Any]
    users: dict[str, Any]


@dataclass
class Api:
    """A running app on real services, plus what the tests need to drive it."""

    settings: Settings
    engine: Engine
    store: BlobStore
    app: FastAPI
    client: TestClient
    tenants: list[Tenant] = field(default_factory=list)

    def add_tenant(self, toggles: dict[str, bool] | None = None, *, jobs: int = 50) -> Tenant:
        company = add_company(
            self.engine,
            name="Acme field services",
            connector="synthetic",
            config={"jobs_per_day": jobs},
            toggles=toggles or {},
        )
        document = schedule_document(company.id, jobs=jobs)
        publish_document(
            self.engine,
            self.store,
            company_id=company.id,
            resource="schedule",
            partition=PARTITION,
            document=document,
        )
        users = {"company_id": company.id, "users": [{"EmployeeInformationId": 1000, "Name": "Ada"}]}
        publish_document(
            self.engine, self.store, company_id=company.id, resource="users", partition="all", document=users
        )
        tenant = Tenant(company.id, document, users)
        self.tenants.append(tenant)
        return tenant

    def token(self, company_id: int, role: str, employee_id: str | int | None = None, **kwargs: Any) -> str:
        return issue_token(self.settings, company_id=company_id, role=role, employee_id=employee_id, **kwargs)

    def headers(self, company_id: int, role: str, employee_id: str | int | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(company_id, role, employee_id)}"}


def start_api(settings: Settings, engine: Engine, store: BlobStore) -> Generator[Api, None, None]:
    runtime = Runtime(settings=settings, engine=engine, store=store)
    app = create_app(runtime)
    with TestClient(app) as client:
        yield Api(settings=settings, engine=engine, store=store, app=app, client=client)


@pytest.fixture
def api(api_settings: Settings, api_engine: Engine, local_store: BlobStore) -> Iterator[Api]:
    """The app on PostgreSQL and a local blob directory."""
    yield from start_api(api_settings, api_engine, local_store)


@pytest.fixture
def api_on_each_store(api_settings: Settings, api_engine: Engine, blob_store: BlobStore) -> Iterator[Api]:
    """The app on PostgreSQL and, in turn, each blob store implementation (local, S3)."""
    yield from start_api(api_settings, api_engine, blob_store)
