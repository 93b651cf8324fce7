"""Self-service for tenants: a company's manager syncs and watches their own company's jobs.

Authenticated like the read API (``Authorization: Bearer <JWT>``). The scope is always the
token's company; managers and admins of that company may start and watch syncs, technicians
may do neither (403). ``GET /v1/jobs…`` shows the company's slice of each job (``pipeline.tenancy``): of a
job spanning companies, only the caller's tasks and counts. Another company's job answers the
very same 404 as a job that does not exist.

These routes must be registered before the read API's ``/v1/{resource}``, which would
otherwise take ``/v1/jobs`` for a resource name.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.responses import Response

from pipeline.api.control import (
    STREAM_RESPONSES,
    SYNC_CONFLICTS,
    Control,
    JobStatus,
    PartitionKey,
    ResourceName,
    event_stream_response,
    immediate_or_queued,
)
from pipeline.api.deps import CurrentPrincipal, State
from pipeline.api.errors import ErrorBody
from pipeline.auth import Principal
from pipeline.control import JobDetail, JobSummary
from pipeline.tenancy import company_event_stream, company_job_detail, company_jobs

SYNC_ROLES = ("admin", "manager")

RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid bearer token"},
    422: {"model": ErrorBody, "description": "Invalid request; the message names the field"},
    503: {"model": ErrorBody, "description": "The database is unavailable"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such job, or not the caller's company's (the same answer)"}
}

router = APIRouter(tags=["self-service"], responses=RESPONSES)


class TenantSyncRequest(BaseModel):
    """What to sync of the caller's company; an omitted list means all."""

    model_config = ConfigDict(extra="forbid", strict=True)

    resources: list[ResourceName] | None = Field(default=None, max_length=1000)
    partitions: list[PartitionKey] | None = Field(default=None, max_length=10_000)
    mode: Literal["full", "incremental"] = "full"
    immediate: bool = Field(default=False, description="Run the sync before answering (small scopes only)")


class TenantSyncAccepted(BaseModel):
    job_id: uuid.UUID
    status: str
    total_tasks: int
    status_url: str
    events_url: str


def require_sync_role(principal: Principal) -> None:
    if principal.role not in SYNC_ROLES:
        raise HTTPException(
            403, f"a {principal.role} cannot start or watch syncs; a manager or admin of the company can"
        )


FORBIDDEN: dict[int | str, dict[str, Any]] = {403: {"model": ErrorBody, "description": "The caller is a technician"}}


@router.post(
    "/v1/sync",
    status_code=202,
    response_model=TenantSyncAccepted,
    responses={
        200: {"model": JobDetail, "description": "`immediate`: the finished job"},
        403: {"model": ErrorBody, "description": "The caller is a technician"},
        **SYNC_CONFLICTS,
    },
    summary="Sync the caller's company: plans the job and queues its tasks (or runs them, `immediate`)",
)
def tenant_sync(body: TenantSyncRequest, principal: CurrentPrincipal, state: State, control: Control) -> Any:
    require_sync_role(principal)

    def accepted(job_id: uuid.UUID, _resources: list[str], status: str, total_tasks: int) -> TenantSyncAccepted:
        return TenantSyncAccepted(job_id=job_id, status=status, total_tasks=total_tasks,
                                  status_url=f"/v1/jobs/{job_id}", events_url=f"/v1/jobs/{job_id}/events")

    def finished(job_id: uuid.UUID) -> JobDetail:
        return company_job_detail(state.runtime.engine, job_id=job_id, company_id=principal.company_id)

    return immediate_or_queued(
        state, control, immediate=body.immediate, company_ids=[principal.company_id], resources=body.resources,
        partitions=body.partitions, mode=body.mode, accepted=accepted, finished=finished,
    )


@router.get(
    "/v1/jobs", response_model=list[JobSummary], responses=FORBIDDEN,
    summary="The caller's company's recent jobs, newest first",
)
def tenant_jobs(
    principal: CurrentPrincipal,
    state: State,
    status: Annotated[JobStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> Any:
    require_sync_role(principal)
    return company_jobs(state.runtime.engine, company_id=principal.company_id, status=status, limit=limit)


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobDetail,
    responses={**NOT_FOUND, **FORBIDDEN},
    summary="The caller's company's part of a job: status, progress with ETA, its tasks",
)
def tenant_job(
    job_id: uuid.UUID,
    principal: CurrentPrincipal,
    state: State,
    task_limit: Annotated[int, Query(ge=0, le=100_000)] = 1000,
) -> Any:
    require_sync_role(principal)
    return company_job_detail(state.runtime.engine, job_id=job_id, company_id=principal.company_id,
                              task_limit=task_limit)


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=Response,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events of the caller's tasks"},
        **NOT_FOUND,
        **FORBIDDEN,
        **STREAM_RESPONSES,
    },
    summary="Live events of the caller's company's part of a job (Server-Sent Events)",
)
async def tenant_job_events(job_id: uuid.UUID, principal: CurrentPrincipal, state: State, control: Control) -> Response:
    require_sync_role(principal)
    stream = company_event_stream(state.runtime.engine, control.feed(), job_id, company_id=principal.company_id)
    return await event_stream_response(stream, slots=control.streams)

