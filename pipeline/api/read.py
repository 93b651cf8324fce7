"""The read API: a company's published documents, filtered for the caller.

Endpoints are ``async`` and answer from memory when they can; whatever blocks (database,
blob store, filtering a document the first time) runs in the threadpool.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from connectors.base import ResourceSpec
from pipeline.api.deps import (
    ApiState,
    CompanyView,
    CurrentPrincipal,
    DatasetView,
    DirectRoute,
    State,
    api_state,
)
from pipeline.api.errors import ERROR_RESPONSES, ErrorBody
from pipeline.auth import Principal
from pipeline.errors import NotFound, StorageAuthError
from pipeline.policies import FULL_VIEW

CACHE_CONTROL = "private, max-age=300"

log = logging.getLogger("pipeline.api")

router = APIRouter()


ResourceName = Annotated[str, Path(description="A resource the company's connector offers", examples=["schedule"])]
PartitionKey = Annotated[str, Path(description="A partition key, e.g. a day", examples=["2030-01-15"])]

DEFAULT_PAGE = 100
MAX_PAGE = 500
"""A listing page is bounded: for a technician, each partition on it is filtered to count their rows."""


class PartitionInfo(BaseModel):
    partition: str
    record_count: int
    synced_at: datetime
    changed_at: datetime
    checksum: str


class Health(BaseModel):
    status: str
    checks: dict[str, str]
    caches: dict[str, dict[str, int]] = {}


def etag_for(checksum: str, view: str) -> str:
    """A strong, quoted ETag naming the bytes and the caller's view of them."""
    return '"' + hashlib.sha256(f"{checksum}:{view}".encode()).hexdigest()[:32] + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of ``If-None-Match`` against our ETag."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


async def _resource(state: ApiState, principal: Principal, resource: str) -> tuple[CompanyView, ResourceSpec]:
    company = await state.company(principal.company_id)
    spec = None if company is None else company.resources.get(resource)
    if company is None or spec is None:
        raise NotFound(resource)
    return company, spec


_LISTING_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One page of partitions, ordered by partition key",
        "headers": {
            "Link": {
                "schema": {"type": "string"},
                "description": 'The next page, `<...?after=KEY&limit=N>; rel="next"`, when there is one',
            }
        },
    },
    **ERROR_RESPONSES,
}


@router.get(
    "/v1/{resource}",
    response_model=list[PartitionInfo],
    responses=_LISTING_RESPONSES,
    summary="List the caller's company's published partitions of a resource, one page at a time",
    description=(
        "Partitions are ordered by key; `after` continues after a key, and a `Link` header with"
        ' `rel="next"` names the next page. A technician\'s `record_count` is that of their view.'
    ),
)
async def list_partitions(
    request: Request,
    resource: ResourceName,
    principal: CurrentPrincipal,
    after: Annotated[str | None, Query(max_length=200, description="Start after this partition key")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Partitions per page")] = DEFAULT_PAGE,
) -> Response:
    state = api_state(request)
    company, spec = await _resource(state, principal, resource)
    listing = await state.listing(company.id, resource)
    start = 0 if after is None else bisect.bisect_right(listing, after, key=lambda dataset: dataset.partition)
    datasets = listing[start : start + limit]
    view = company.view(spec, principal)
    counts = [dataset.record_count for dataset in datasets]
    if view != FULL_VIEW and spec.policy.rows is not None and datasets:
        # The count a technician gets is that of their view, as in the document's own counts.
        counts = await run_in_threadpool(_view_counts, state, datasets, spec, principal, company, view)
    body = orjson.dumps(
        [
            {
                "partition": dataset.partition,
                "record_count": count,
                "synced_at": dataset.synced_at,
                "changed_at": dataset.changed_at,
                "checksum": dataset.checksum,
            }
            for dataset, count in zip(datasets, counts, strict=True)
        ]
    )
    headers = {"Cache-Control": "private, no-cache"}
    if start + limit < len(listing):
        following = f"/v1/{quote(resource, safe='')}?after={quote(datasets[-1].partition, safe='')}&limit={limit}"
        headers["Link"] = f'<{following}>; rel="next"'
    return Response(body, media_type="application/json", headers=headers)


def _view_counts(
    state: ApiState,
    datasets: tuple[DatasetView, ...],
    spec: ResourceSpec,
    principal: Principal,
    company: CompanyView,
    view: str,
) -> list[int]:
    counts = []
    for dataset in datasets:
        body = state.render(dataset, spec.policy, principal, company.toggles, view)
        rows = orjson.loads(body).get(spec.policy.rows)
        counts.append(len(rows) if isinstance(rows, list) else 0)
    return counts


_DOCUMENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The document, with the fields the caller may not see absent",
        "content": {"application/json": {"schema": {"type": "object", "additionalProperties": True}}},
        "headers": {
            "ETag": {
                "schema": {"type": "string"},
                "description": "Changes with the data or the caller's view",
            },
            "Cache-Control": {"schema": {"type": "string"}},
        },
    },
    304: {"description": "Not modified: the If-None-Match ETag is current"},
    **ERROR_RESPONSES,
}


async def read_partition(
    request: Request, resource: ResourceName, partition: PartitionKey, principal: CurrentPrincipal
) -> Response:
    # Served through DirectRoute (see there): this signature may hold nothing more.
    state = api_state(request)
    company, spec = await _resource(state, principal, resource)
    dataset = await state.dataset(company.id, resource, partition)
    if dataset is None:
        raise NotFound(f"{resource}/{partition}")
    view = company.view(spec, principal)
    headers = {"ETag": etag_for(dataset.checksum, view), "Cache-Control": CACHE_CONTROL}
    if etag_matches(request.headers.get("if-none-match"), headers["ETag"]):
        return Response(status_code=304, headers=headers)
    body = state.cached_body(dataset, view)
    if body is None:
        body = await run_in_threadpool(state.render, dataset, spec.policy, principal, company.toggles, view)
    return Response(body, media_type="application/json", headers=headers)


router.add_api_route(
    "/v1/{resource}/{partition}",
    read_partition,
    methods=["GET"],
    route_class_override=DirectRoute,
    response_class=Response,
    responses=_DOCUMENT_RESPONSES,
    summary="Read one partition's document, filtered by the caller's role and the company's toggles",
    description=(
        "Admins and managers get the whole document. Technicians get only the rows they are assigned"
        " to, without the fields their role and the company's feature toggles hide: hidden fields are"
        " absent, never null. The ETag changes with the data and with the caller's view of it; send it"
        " back in If-None-Match to get 304. Another company's partition answers 404 like a missing one."
    ),
    openapi_extra={
        "parameters": [
            {
                "name": "If-None-Match",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "An ETag from an earlier answer: 304 when it is still current",
            }
        ]
    },
)


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": ErrorBody, "description": "The database or the blob store is unreachable"}},
    summary="Check the database and the blob store",
)
def healthz(state: State) -> Response:
    checks: dict[str, str] = {}
    try:
        with state.runtime.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        log.error("health check: database unreachable: %s", exc)
        checks["database"] = f"unreachable ({type(exc).__name__})"
    try:
        state.runtime.store.ping()
        checks["store"] = "ok"
    except StorageAuthError as exc:
        log.error("health check: blob store rejects our credentials: %s", exc)
        checks["store"] = f"credentials rejected ({type(exc).__name__})"
    except Exception as exc:
        log.error("health check: blob store unreachable: %s", exc)
        checks["store"] = f"unreachable ({type(exc).__name__})"
    failing = [name for name, result in checks.items() if result != "ok"]
    if failing:
        labels = {"database": "database", "store": "store (blob storage)"}
        message = "unhealthy: " + "; ".join(f"{labels[name]} {checks[name]}" for name in failing)
        payload = {
            "error": {"code": "unavailable", "message": message},
            "status": "unavailable",
            "checks": checks,
        }
        return Response(orjson.dumps(payload), status_code=503, media_type="application/json")
    caches = {
        name: {"entries": s.entries, "size_bytes": s.size_bytes, "hits": s.hits, "misses": s.misses}
        for name, s in (("objects", state.objects.stats()), ("bodies", state.bodies.stats()))
    }
    return Response(orjson.dumps({"status": "ok", "checks": checks, "caches": caches}), media_type="application/json")
