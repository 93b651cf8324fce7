"""Admin endpoints for companies (tenants), validated exactly like the CLI (``pipeline.companies``).

Behind the admin key (``X-API-Key``), like the rest of the control API. Secrets in a config are
write-only: responses show them as ``"***"``, and a PATCH that omits one keeps it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from pipeline.api.control import ADMIN_RESPONSES, MAX_ID, require_admin
from pipeline.api.deps import State
from pipeline.api.errors import ErrorBody, error_response
from pipeline.companies import add_company, get_company, list_companies, update_company
from pipeline.errors import ConfigError
from pipeline.models import Company
from pipeline.secrets import redact

router = APIRouter(tags=["companies"], dependencies=[Depends(require_admin)], responses=ADMIN_RESPONSES)

Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
CompanyIdPath = Annotated[int, Path(gt=0, le=MAX_ID)]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such company"}}


CONFIG_DESCRIPTION = (
    "Connector config. Secrets inline (e.g. auth.token) are stored encrypted and shown as \"***\"; "
    "environment references (token_env, value_env) must use the operator's allowed prefix"
)


class CompanyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    connector: Annotated[str, StringConstraints(min_length=1, max_length=50)]
    config: dict[str, Any] = Field(default_factory=dict, description=CONFIG_DESCRIPTION)
    toggles: dict[str, Any] = Field(default_factory=dict, description="Feature toggles: name → true/false")
    external_id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    enabled: bool = True


class CompanyPatch(BaseModel):
    """Only the fields given change; ``config`` and ``toggles`` are replaced whole."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    config: dict[str, Any] | None = Field(
        default=None, description=CONFIG_DESCRIPTION + "; a secret omitted or sent as \"***\" keeps the stored one"
    )
    toggles: dict[str, Any] | None = None
    enabled: bool | None = None


class CompanyOut(BaseModel):
    id: int
    name: str
    external_id: str | None
    connector: str
    config: dict[str, Any]
    toggles: dict[str, Any]
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, company: Company) -> CompanyOut:
        return cls(
            id=company.id,
            name=company.name,
            external_id=company.external_id,
            connector=company.connector,
            config=redact(company.connector_config or {}),
            toggles=company.feature_toggles or {},
            enabled=company.sync_enabled,
            created_at=company.created_at,
            updated_at=company.updated_at,
        )


@router.post("/companies", status_code=201, response_model=CompanyOut, summary="Add a company")
def post_company(body: CompanyIn, state: State) -> Any:
    try:
        company = add_company(
            state.runtime.engine,
            name=body.name,
            connector=body.connector,
            config=body.config,
            toggles=body.toggles,
            external_id=body.external_id,
            enabled=body.enabled,
            context=state.runtime.connector_context,
            secrets=state.runtime.secrets,
        )
    except ConfigError as exc:
        return error_response(422, "invalid_request", str(exc))
    return CompanyOut.of(company)


@router.get("/companies", response_model=list[CompanyOut], summary="List companies")
def get_companies(state: State) -> Any:
    return [CompanyOut.of(company) for company in list_companies(state.runtime.engine)]


@router.get("/companies/{company_id}", response_model=CompanyOut, responses=NOT_FOUND, summary="One company")
def get_one_company(company_id: CompanyIdPath, state: State) -> Any:
    return CompanyOut.of(get_company(state.runtime.engine, company_id))


@router.patch(
    "/companies/{company_id}",
    response_model=CompanyOut,
    responses=NOT_FOUND,
    summary="Change a company's name, connector config, feature toggles or sync switch",
)
def patch_company(company_id: CompanyIdPath, body: CompanyPatch, state: State) -> Any:
    try:
        company = update_company(
            state.runtime.engine,
            company_id,
            name=body.name,
            config=body.config,
            toggles=body.toggles,
            enabled=body.enabled,
            context=state.runtime.connector_context,
            secrets=state.runtime.secrets,
        )
    except ConfigError as exc:
        return error_response(422, "invalid_request", str(exc))
    return CompanyOut.of(company)
