"""The app factories, the metadata cache and ``DirectRoute``'s guard."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from fastapi import APIRouter, Request
from fastapi.testclient import TestClient
from starlette.responses import Response

from pipeline.api import create_app_from_env
from pipeline.api.deps import CurrentPrincipal, DirectRoute, TTLCache
from pipeline.api.serve import log_config, settings_environment
from pipeline.errors import ConfigError
from pipeline.settings import Settings, load_settings
from tests.pipeline.api.helpers import SECRET


def test_the_uvicorn_factory_builds_the_app_from_the_environment(
    api_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPELINE_DATABASE_URL", api_database_url)
    monkeypatch.setenv("PIPELINE_BLOB_URL", (tmp_path / "blobs").as_uri())
    monkeypatch.setenv("PIPELINE_JWT_SECRET", SECRET)
    with TestClient(create_app_from_env()) as client:
        assert client.get("/healthz").json()["checks"] == {"database": "ok", "store": "ok"}


def test_the_factory_refuses_to_start_without_a_jwt_secret(
    api_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPELINE_DATABASE_URL", api_database_url)
    monkeypatch.setenv("PIPELINE_BLOB_URL", (tmp_path / "blobs").as_uri())
    monkeypatch.delenv("PIPELINE_JWT_SECRET", raising=False)
    with pytest.raises(ConfigError, match="PIPELINE_JWT_SECRET is not set"):
        create_app_from_env()


def test_serve_hands_worker_processes_the_same_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(jwt_secret=SECRET, log_level="WARNING", worker_threads=7, s3_secure=True)
    for name, value in settings_environment(settings).items():
        monkeypatch.setenv(name, value)
    assert load_settings() == settings
    assert log_config("WARNING")["loggers"]["pipeline"]["level"] == "WARNING"


def test_a_direct_route_refuses_parameters_it_would_not_pass() -> None:
    async def with_query(request: Request, principal: CurrentPrincipal, limit: int = 1) -> Response:
        return Response()

    async def without_principal(request: Request, name: str) -> Response:
        return Response()

    async def int_path(request: Request, principal: CurrentPrincipal, name: int) -> Response:
        return Response()

    def not_async(request: Request, principal: CurrentPrincipal, name: str) -> Response:
        return Response()

    for endpoint in (with_query, without_principal, int_path, not_async):
        with pytest.raises(TypeError, match="DirectRoute"):
            APIRouter().add_api_route("/x/{name}", endpoint, route_class_override=DirectRoute)


def test_metadata_entries_are_refreshed_in_the_background_once_stale() -> None:
    loads: list[int] = []

    def load() -> int:
        loads.append(1)
        return len(loads)

    async def scenario() -> None:
        cache: TTLCache[str, int] = TTLCache(0.2, 10, stale_s=5)
        assert await cache.get_or_load("k", load) == 1
        assert await cache.get_or_load("k", load) == 1 and len(loads) == 1  # fresh: no load
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (found := cache.lookup("k")) is not None and found[0] < 0.2:
            await asyncio.sleep(0.02)
        assert await cache.get_or_load("k", load) == 1  # stale: served at once, refresh started
        while time.monotonic() < deadline and await cache.get_or_load("k", load) != 2:
            await asyncio.sleep(0.02)
        assert await cache.get_or_load("k", load) == 2 and len(loads) == 2

    asyncio.run(scenario())


def test_concurrent_misses_share_one_load_and_too_old_entries_are_not_served() -> None:
    loads: list[int] = []

    def load() -> int:
        time.sleep(0.05)
        loads.append(1)
        return len(loads)

    async def scenario() -> None:
        cache: TTLCache[str, int] = TTLCache(0.05, 10, stale_s=0.05)
        assert await asyncio.gather(*(cache.get_or_load("k", load) for _ in range(20))) == [1] * 20
        deadline = time.monotonic() + 5
        while cache.lookup("k") is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert await cache.get_or_load("k", load) == 2  # waited for a new load

    asyncio.run(scenario())
