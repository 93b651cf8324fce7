"""The FastAPI application: ``create_app(runtime)`` for tests and embedding, and
``create_app_from_env()`` for ``uvicorn --factory`` (what ``pipeline serve`` runs).

Without a usable ``PIPELINE_JWT_SECRET`` (unset or shorter than 32 bytes) the app refuses to
start: ``create_app`` raises ``ConfigError`` naming the variable, so a misconfigured server never
listens rather than answering every request with an error.

More routers (the control API) join with ``app.include_router``; they reach the runtime and the
caches through ``pipeline.api.deps.State`` (``app.state.api``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from connectors.rest.config import ENV_VAR_PATTERN
from pipeline.api import companies, control, metrics, read, tenant
from pipeline.api.deps import ApiState
from pipeline.api.errors import BODY_RESPONSES, install_error_handlers
from pipeline.api.limits import BodyLimit
from pipeline.console import install_console
from pipeline.runtime import Runtime
from pipeline.settings import load_settings

FACTORY = "pipeline.api.app:create_app_from_env"
"""The import string uvicorn needs to start the app in worker processes."""


def create_app(
    runtime: Runtime,
    *,
    close_runtime: bool = False,
    object_cache_bytes: int = 256 * 1024 * 1024,
    body_cache_bytes: int = 64 * 1024 * 1024,
    metadata_ttl_s: float = 1.0,
) -> FastAPI:
    """Build the API around ``runtime``.

    Parameters:
        runtime: settings, engine and blob store.
        close_runtime: close ``runtime`` when the app shuts down (when the app owns it).
        object_cache_bytes: memory for verified object bytes (LRU by checksum).
        body_cache_bytes: memory for filtered bodies (LRU by checksum and view).
        metadata_ttl_s: how long company and dataset rows are fresh; stale ones are served at
            most as long again while they refresh, so toggle changes and new versions show within
            ``2 × metadata_ttl_s`` plus one round trip. At most 2 s.

    Raises:
        ConfigError: no usable ``PIPELINE_JWT_SECRET``.

    Returns:
        The application; ``app.state.api`` is its ``ApiState``.
    """
    if not 0 <= metadata_ttl_s <= 2:
        raise ValueError(f"metadata_ttl_s must be within [0, 2] s, got {metadata_ttl_s}")
    state = ApiState(
        runtime,
        object_cache_bytes=object_cache_bytes,
        body_cache_bytes=body_cache_bytes,
        metadata_ttl_s=metadata_ttl_s,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if close_runtime:
                runtime.close()

    app = FastAPI(
        title="sync-pipeline",
        summary="Published documents, filtered by role and feature toggles, isolated per company",
        version="1",
        lifespan=lifespan,
    )
    app.state.api = state
    install_error_handlers(app)
    # Before the read API: its /v1/{resource} would take /v1/jobs for a resource.
    # The hot read path and the routes matched before it sit directly in the app's route list:
    # ``include_router`` (FastAPI 0.165) wraps a router in an ``_IncludedRouter`` that matches its
    # routes twice per request (``matches``, then ``handle``), a quarter of a technician read's CPU
    # (49.7 → 37.4 µs per request in-process; docs/benchmarks.md, section 6). Neither router has a
    # prefix or router-level dependencies, and the OpenAPI document is byte-identical either way.
    app.router.routes.extend(tenant.router.routes)
    app.router.routes.extend(read.router.routes)
    # Without an admin key the control endpoints answer 503 and are left out of the schema.
    control_enabled = bool(runtime.settings.admin_api_key)
    app.include_router(control.router, include_in_schema=control_enabled)
    app.include_router(companies.router, include_in_schema=control_enabled)
    app.include_router(metrics.router)
    install_console(app)
    app.add_middleware(BodyLimit, max_bytes=runtime.settings.api_max_body_bytes)
    app.add_middleware(metrics.RequestLatency)
    _document_body_errors(app, runtime)
    return app


def _document_body_errors(app: FastAPI, runtime: Runtime) -> None:
    """Add the 400 (unparseable body) and 413 (``BodyLimit``) answers to every operation taking a body,
    and state what the request models check beyond their own schema: no string may hold U+0000
    (PostgreSQL cannot store it; 422), and environment references (``token_env``, ``value_env``)
    start with this deployment's ``PIPELINE_CONNECTOR_ENV_PREFIX``.

    Done on the generated document rather than route by route, so a new route with a body cannot
    be left undocumented.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                if not isinstance(operation, dict) or "requestBody" not in operation:
                    continue
                responses = operation.setdefault("responses", {})
                for status, response in BODY_RESPONSES.items():
                    responses.setdefault(
                        str(status),
                        {
                            "description": response["description"],
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                        },
                    )
        _forbid_nul_in_request_bodies(schema)
        _state_env_prefix(schema, runtime.settings.connector_env_prefix)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app_from_env() -> FastAPI:
    """The ``uvicorn --factory`` entry point: settings from ``PIPELINE_*``, a runtime the app owns.

    Raises:
        ConfigError: invalid settings or no usable JWT secret.
    """
    settings = load_settings()
    logging.getLogger("pipeline").setLevel(settings.log_level)
    runtime = Runtime.from_settings(settings)
    try:
        return create_app(runtime, close_runtime=True)
    except BaseException:
        runtime.close()
        raise


NO_NUL = "^[^\\x00]*$"


def _forbid_nul_in_request_bodies(document: dict[str, Any]) -> None:
    """Constrain every string (and object key) of the schemas request bodies use to exclude U+0000."""
    components: dict[str, Any] = document.get("components", {}).get("schemas", {})
    pending = [
        operation["requestBody"]
        for path_item in document.get("paths", {}).values()
        for operation in path_item.values()
        if isinstance(operation, dict) and "requestBody" in operation
    ]
    seen: set[str] = set()
    constrained: set[int] = set()
    while pending:
        node = pending.pop()
        for ref in _refs(node):
            name = ref.rsplit("/", 1)[-1]
            if name not in seen and name in components:
                seen.add(name)
                pending.append(components[name])
        _no_nul(node, constrained)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _no_nul(node: Any, constrained: set[int]) -> None:
    if isinstance(node, list):
        for item in node:
            _no_nul(item, constrained)
        return
    if not isinstance(node, dict) or id(node) in constrained:
        return
    constrained.add(id(node))  # a schema reached twice is constrained once
    if node.get("type") == "string" and "const" not in node and "enum" not in node:
        if "pattern" not in node:
            node["pattern"] = NO_NUL
        elif "\\x00" not in node["pattern"]:
            node.setdefault("allOf", []).append({"pattern": NO_NUL})
    open_keys = node.get("additionalProperties") not in (None, False) or "patternProperties" in node
    if node.get("type") == "object" and open_keys:
        node.setdefault("propertyNames", {}).setdefault("pattern", NO_NUL)
    for key, value in node.items():
        if key != "not":  # constraining a negated schema would widen what it accepts
            _no_nul(value, constrained)


def _state_env_prefix(document: dict[str, Any], prefix: str) -> None:
    """Narrow every environment-variable-name pattern to the names this deployment allows."""
    allowed = "^" + re.escape(prefix) + "[A-Za-z0-9_]*$"

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("pattern") == ENV_VAR_PATTERN:
                node["pattern"] = allowed
                node["description"] = f"The name of an environment variable starting with {prefix}"
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(document)
