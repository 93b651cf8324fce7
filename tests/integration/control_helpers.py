"""Helpers for the control API's integration tests: the app on the real stack, a live server."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipeline.api import create_app
from pipeline.api.control import ControlState
from pipeline.companies import add_company
from pipeline.dispatch import Dispatcher
from pipeline.progress import job_progress
from pipeline.runtime import Runtime
from tests.services import free_port, wait_for

ADMIN_KEY = "control-tests-admin-key"
JWT_SECRET = "control-tests-jwt-secret-0123456789abcdef"
ADMIN = {"X-API-Key": ADMIN_KEY}


def control_runtime(stack: Runtime, **overrides: Any) -> Runtime:
    """``stack`` with the admin key and a JWT secret set (same engine and store)."""
    settings = stack.settings.model_copy(
        update={"admin_api_key": ADMIN_KEY, "jwt_secret": JWT_SECRET, **overrides}
    )
    return Runtime(settings=settings, engine=stack.engine, store=stack.store)


def control_app(runtime: Runtime, dispatcher: Dispatcher) -> FastAPI:
    app = create_app(runtime)
    app.state.control = ControlState(runtime, dispatcher=dispatcher)
    return app


@contextmanager
def control_client(runtime: Runtime, dispatcher: Dispatcher) -> Iterator[TestClient]:
    with TestClient(control_app(runtime, dispatcher), headers=ADMIN) as client:
        yield client


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread (streaming needs a real server); yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10, what="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def add_synthetic(rt: Runtime, name: str, **config: Any) -> int:
    return add_company(rt.engine, name=name, connector="synthetic", config=config).id


def wait_job(rt: Runtime, job_id: uuid.UUID | str, timeout: float = 60) -> None:
    jid = uuid.UUID(str(job_id))
    wait_for(lambda: job_progress(rt.engine, jid).finished, timeout=timeout, what=f"job {jid} to finish")


def read_events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """Parse a ``text/event-stream`` body into ``(event, data)`` pairs (comments skipped)."""
    name, data = "message", list[str]()
    for line in response.iter_lines():
        if not line:
            if data:
                yield name, orjson.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].strip())
