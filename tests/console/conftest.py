"""The console on the real stack (PostgreSQL, RabbitMQ, S3, an in-process worker), served by
uvicorn on a free port, and headless Chromium driven by Playwright.

The browser is Debian's ``chromium`` package (``apt-get install -y chromium chromium-driver``),
launched by path: the tests never download a browser (no ``playwright install``). Without it,
the browser tests skip and say why.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from fastapi import FastAPI

from actors.tasks import Actors
from pipeline.runtime import Runtime
from tests.integration.conftest import actors, make_settings, migrated_url, stack, worker
from tests.integration.control_helpers import ADMIN_KEY, control_app, control_runtime, live_server

__all__ = ["actors", "make_settings", "migrated_url", "stack", "worker"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
BUCKET_BROWSER = "http://127.0.0.1:9001/browser"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


@dataclass
class Console:
    """A running console: its base URL, the runtime behind it and the app."""

    base: str
    runtime: Runtime
    app: FastAPI

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def console(stack: Runtime, actors: Actors, worker: dramatiq.Worker) -> Iterator[Console]:
    rt = control_runtime(stack, s3_console_url=BUCKET_BROWSER)
    app = control_app(rt, actors)
    with live_server(app) as base:
        yield Console(base, rt, app)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium chromium-driver")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists()
                                             else shutil.which("chromium"), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(30_000)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)


def log_in_as_operator(page: Any, console: Console) -> None:
    page.goto(console.url("/console/login"))
    page.fill("#operator-login input[name=admin_key]", ADMIN_KEY)
    page.click("#operator-login button")
    page.wait_for_url(re.compile(r".*/console/jobs$"))


def log_in_with_token(page: Any, console: Console, token: str) -> None:
    page.goto(console.url("/console/login"))
    page.fill("#tenant-login textarea[name=token]", token)
    page.click("#tenant-login button")
