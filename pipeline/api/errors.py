"""HTTP status codes for the product's errors: every error answer is ``{"error": {"code", "message"}}``.

This is the only place that maps ``PipelineError`` subclasses to HTTP. Messages never carry
document content, so an error cannot leak a field the caller's view hides.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from pipeline.errors import (
    AuthError,
    ChecksumMismatch,
    ConfigError,
    IdentityProviderUnavailable,
    NotFound,
    ObjectMissing,
    PipelineError,
    RequestConflict,
    StorageError,
)

log = logging.getLogger("pipeline.api")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


NOT_FOUND_MESSAGE = "not found"


def not_found() -> Response:
    """The one 404 answer: unknown resource, partition, unpublished or another company's alike."""
    return error_response(404, "not_found", NOT_FOUND_MESSAGE)


async def _auth_error(_: Request, exc: Exception) -> Response:
    return error_response(
        401,
        "unauthorized",
        str(exc) or "unauthorized",
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


async def _not_found(_: Request, exc: Exception) -> Response:
    return not_found()


async def _provider_unavailable(request: Request, exc: Exception) -> Response:
    log.error("token not verified on %s: %s", request.url.path, exc)
    return error_response(
        503,
        "identity_provider_unavailable",
        "the identity provider's keys could not be fetched; retry later",
        headers={"Retry-After": "5"},
    )


async def _checksum_mismatch(request: Request, exc: Exception) -> Response:
    log.error("refused to serve %s: %s", request.url.path, exc)
    return error_response(
        502,
        "checksum_mismatch",
        "the stored document failed its SHA-256 integrity check and was not served",
    )


async def _object_missing(request: Request, exc: Exception) -> Response:
    log.error("stored document missing for %s: %s", request.url.path, exc)
    return error_response(502, "object_missing", "the stored document is missing from the blob store")


async def _storage_unavailable(request: Request, exc: Exception) -> Response:
    log.error("blob store unavailable for %s: %s", request.url.path, exc)
    return error_response(503, "storage_unavailable", "the blob store is unavailable; retry later")


async def _database_unavailable(request: Request, exc: Exception) -> Response:
    log.error("database unavailable for %s: %s", request.url.path, exc)
    return error_response(503, "database_unavailable", "the database is unavailable; retry later")


async def _config_error(request: Request, exc: Exception) -> Response:
    log.error("configuration error on %s: %s", request.url.path, exc)
    return error_response(500, "misconfigured", "the server is misconfigured; see its log")


async def _request_conflict(_: Request, exc: Exception) -> Response:
    return error_response(409, "conflict", str(exc))


async def _pipeline_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled pipeline error on %s", request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def allowed_methods(request: Request) -> list[str]:
    """The methods this path answers to (Starlette's 405 names one route's only).

    From the OpenAPI document when it describes the path: when several templates match
    (``/v1/sync`` and ``/v1/{resource}``), the most specific one (fewest parameters) is the
    resource the path names. Otherwise (a route left out of the document) the router is asked,
    method by method, so included routers and mounts are covered.
    """
    path = request.url.path
    documented: list[tuple[int, set[str]]] = []
    for template, item in request.app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            methods = {method.upper() for method in item}
            documented.append((template.count("{"), methods | ({"HEAD"} if "GET" in methods else set())))
    if documented:
        fewest = min(count for count, _ in documented)
        return sorted({method for count, methods in documented if count == fewest for method in methods})
    allowed = []
    for method in HTTP_METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return not_found()
    code = {
        400: "bad_request",
        405: "method_not_allowed",
        401: "unauthorized",
        403: "forbidden",
        413: "body_too_large",
    }.get(exc.status_code, "http_error")
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_response(exc.status_code, code, str(exc.detail), headers=headers or None)


def _field(location: Any) -> str:
    parts = [str(part) for part in location]
    if parts and parts[0] in {"path", "query", "header", "body", "cookie"}:
        return f"{parts[0]} parameter {'.'.join(parts[1:])!r}" if len(parts) > 1 else parts[0]
    return ".".join(parts) or "request"


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = [f"{_field(error.get('loc', ()))}: {error.get('msg', 'invalid')}" for error in exc.errors()]
    return error_response(422, "invalid_request", "; ".join(problems) or "invalid request")


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; the most specific exception class wins (Starlette walks the MRO)."""
    app.add_exception_handler(AuthError, _auth_error)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(IdentityProviderUnavailable, _provider_unavailable)
    app.add_exception_handler(ChecksumMismatch, _checksum_mismatch)
    app.add_exception_handler(ObjectMissing, _object_missing)
    app.add_exception_handler(StorageError, _storage_unavailable)
    app.add_exception_handler(ConfigError, _config_error)
    app.add_exception_handler(RequestConflict, _request_conflict)
    app.add_exception_handler(PipelineError, _pipeline_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid bearer token"},
    404: {"model": ErrorBody, "description": "Unknown resource or partition (or another company's)"},
    422: {"model": ErrorBody, "description": "Invalid request; the message names the field"},
    502: {"model": ErrorBody, "description": "The stored document failed its integrity check"},
    503: {
        "model": ErrorBody,
        "description": "The database, the blob store or the identity provider's key set is unavailable",
    },
}
"""OpenAPI ``responses`` for routes that authenticate and read datasets."""

BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The body could not be parsed"},
    413: {"model": ErrorBody, "description": "The body is larger than PIPELINE_API_MAX_BODY_BYTES"},
}
"""OpenAPI ``responses`` added to every operation that takes a body (see ``pipeline.api.app``)."""
