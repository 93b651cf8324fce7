"""The app factories, the metadata cache and ``DirectRoute``'s guard."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
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


class Clock:
    """A clock the test moves by hand (``TTLCache(timer=...)``), so no cache test depends on
    how fast this machine runs."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` on the event loop; the deadline only bounds a hang, it times nothing."""
    deadline = time.monotonic() + 30
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_metadata_entries_are_refreshed_in_the_background_once_stale() -> None:
    loads: list[int] = []
    release = threading.Event()

    def load() -> int:
        if loads:  # the refresh waits until the test has seen the stale value served
            assert release.wait(30)
        loads.append(1)
        return len(loads)

    async def scenario() -> None:
        clock = Clock()
        cache: TTLCache[str, int] = TTLCache(10, 10, stale_s=5, timer=clock)
        assert await cache.get_or_load("k", load) == 1
        clock.now += 9.5
        assert await cache.get_or_load("k", load) == 1 and len(loads) == 1  # fresh: no load
        assert cache.lookup("k") == (9.5, 1)
        clock.now += 0.5
        # Stale: served at once, while the one refresh it started is still blocked in its load.
        for _ in range(5):
            assert await cache.get_or_load("k", load) == 1
        release.set()

        async def refreshed() -> bool:
            return await cache.get_or_load("k", load) == 2

        await until(refreshed, "the background refresh")
        assert len(loads) == 2, "stale reads share one refresh"
        assert cache.lookup("k") == (0.0, 2), "the refreshed entry is fresh again"

    asyncio.run(scenario())


def test_concurrent_misses_share_one_load_and_too_old_entries_are_not_served() -> None:
    loads: list[int] = []

    def load() -> int:
        loads.append(1)
        return len(loads)

    async def scenario() -> None:
        clock = Clock()
        cache: TTLCache[str, int] = TTLCache(10, 10, stale_s=5, timer=clock)
        # Every caller reaches the cache before the load task first runs, so all share it.
        assert await asyncio.gather(*(cache.get_or_load("k", load) for _ in range(20))) == [1] * 20
        assert len(loads) == 1
        clock.now += 14.5
        assert cache.lookup("k") == (14.5, 1), "stale, still served"
        clock.now += 0.5
        assert cache.lookup("k") is None, "ttl_s + stale_s old: never served"
        assert await cache.get_or_load("k", load) == 2  # waited for a new load
        assert len(loads) == 2

    asyncio.run(scenario())
