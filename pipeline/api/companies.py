"""Admin endpoints for companies (tenants), validated exactly like the CLI (``pipeline.companies``).

Behind the admin key (``X-API-Key``), like the rest of the control API. Secrets in a config are
write-only: responses show them as ``"***"``, and a PATCH that omits one keeps it.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from fastapi import APIRouter, Depends, Path
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ModelWrapValidatorHandler,
    PrivateAttr,
    StringConstraints,
    create_model,
    model_validator,
)

from connectors import registry
from pipeline.api.control import ADMIN_RESPONSES, MAX_ID, require_admin
from pipeline.api.deps import State
from pipeline.api.errors import ErrorBody, error_response
from pipeline.companies import (
    DuplicateCompany,
    add_company,
    get_company,
    list_companies,
    unstorable_at,
    update_company,
)
from pipeline.errors import ConfigError, ForbiddenUpstream
from pipeline.models import Company
from pipeline.secrets import redact

router = APIRouter(tags=["companies"], dependencies=[Depends(require_admin)], responses=ADMIN_RESPONSES)

# Whitespace-only names are refused (they are stripped): the pattern says so in the schema.
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"\S")]
CompanyIdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
Toggles = Annotated[dict[str, bool], Field(description="Feature toggles: name → true/false")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such company"}}
FORBIDDEN_UPSTREAM: dict[int | str, dict[str, Any]] = {
    403: {
        "model": ErrorBody,
        "description": "The config names an IP-literal upstream the network policy refuses"
        " (PIPELINE_UPSTREAM_ALLOWLIST)",
    }
}
# What a schema-valid body can still be refused for (the JSON Schema states everything else).
INVALID_CONFIG: dict[int | str, dict[str, Any]] = {
    422: {
        "model": ErrorBody,
        "description": "Invalid request; the message names the field. Beyond what the schema states, a"
        " graphql config is refused when a resource's `query` is not one GraphQL query operation declaring"
        " every variable the resource sets (no JSON Schema can state a grammar)",
    }
}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "The external id is taken, or the config is for another connector"}
}


CONFIG_DESCRIPTION = (
    "Connector config. Secrets inline (e.g. auth.token) are stored encrypted and shown as \"***\"; "
    "environment references (token_env, value_env) must use the operator's allowed prefix"
)


class _Body(BaseModel):
    """A strict request body (no coercion: ``"enabled": 0`` is not a boolean) that remembers what was sent."""

    model_config = ConfigDict(extra="forbid", strict=True)
    _sent: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_sent(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        found = unstorable_at(data)
        if found:
            raise ValueError(found)
        model = handler(data)
        if isinstance(model, _Body) and isinstance(data, dict):
            model._sent = data
        return model

    def sent_config(self) -> dict[str, Any]:
        """``config`` exactly as the client sent it: stored as sent, after the registry validates it again."""
        config = self._sent.get("config")
        return dict(config) if isinstance(config, dict) else {}


class _CompanyFields(_Body):
    connector: str  # narrowed to one Literal per connector below
    config: Any
    name: Name
    toggles: Toggles = Field(default_factory=dict)
    external_id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    enabled: bool = True


def _company_model(connector: str, config_model: type[BaseModel] | None) -> type[_CompanyFields]:
    """``{"connector": "<connector>", "config": <its config model>, ...}`` for the union below."""
    config: Any
    if config_model is None:
        config = (dict[str, Any], Field(default_factory=dict, description=CONFIG_DESCRIPTION))
    elif any(field.is_required() for field in config_model.model_fields.values()):
        config = (config_model, Field(description=CONFIG_DESCRIPTION))
    else:  # every key optional: the whole config may be left out too
        config = (config_model, Field(default_factory=config_model, description=CONFIG_DESCRIPTION))
    model: type[_CompanyFields] = create_model(
        f"{connector.title().replace('_', '')}CompanyIn",
        __base__=_CompanyFields,
        __doc__=f"A company whose upstream is the {connector!r} connector.",
        connector=(Literal[connector], ...),  # type: ignore[arg-type]
        config=config,
    )
    return model


_COMPANY_MODELS = {name: _company_model(name, model) for name, model in registry.config_models().items()}
_CONFIG_MODELS = {name: model for name, model in registry.config_models().items() if model is not None}

if TYPE_CHECKING:
    CompanyIn = _CompanyFields
else:
    CompanyIn = Annotated[Union[tuple(_COMPANY_MODELS.values())], Field(discriminator="connector")]  # noqa: UP007
# A new company: one body shape per connector, told apart by ``connector`` (a discriminated union).


_ANY_CONFIG: list[JsonValue] = [{"$ref": f"#/components/schemas/{model.__name__}"} for model in _CONFIG_MODELS.values()]
_ANY_CONFIG.append({"type": "null"})


class CompanyPatch(_Body):
    """Only the fields given change; ``config`` and ``toggles`` are replaced whole.

    ``config`` must be a config of the company's own connector (409 otherwise).
    """

    name: Name | None = None
    # Validated by pipeline.companies (which first merges the stored secrets a config omits), and
    # documented as any connector's config: the handler answers 409 for another connector's.
    config: dict[str, Any] | None = Field(
        default=None,
        description=CONFIG_DESCRIPTION + "; a secret omitted or sent as \"***\" keeps the stored one",
        json_schema_extra={"anyOf": _ANY_CONFIG},
    )
    toggles: Toggles | None = None
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


@router.post(
    "/companies",
    status_code=201,
    response_model=CompanyOut,
    responses={**INVALID_CONFIG, **CONFLICT, **FORBIDDEN_UPSTREAM},
    summary="Add a company",
)
def post_company(body: CompanyIn, state: State) -> Any:
    config = body.sent_config()
    try:
        company = add_company(
            state.runtime.engine,
            name=body.name,
            connector=body.connector,
            config=config,
            toggles=body.toggles,
            external_id=body.external_id,
            enabled=body.enabled,
            context=state.runtime.connector_context,
            secrets=state.runtime.secrets,
        )
    except DuplicateCompany as exc:
        return error_response(409, "conflict", str(exc))
    except ForbiddenUpstream as exc:
        return error_response(403, "upstream_refused", str(exc))
    except ConfigError as exc:
        return error_response(422, "invalid_request", str(exc))
    return CompanyOut.of(company)


@router.get("/companies", response_model=list[CompanyOut], summary="List companies")
def get_companies(state: State) -> Any:
    return [CompanyOut.of(company) for company in list_companies(state.runtime.engine)]


@router.get("/companies/{company_id}", response_model=CompanyOut, responses=NOT_FOUND, summary="One company")
def get_one_company(company_id: CompanyIdPath, state: State) -> Any:
    return CompanyOut.of(get_company(state.runtime.engine, company_id))


def _for_another_connector(connector: str, config: dict[str, Any]) -> bool:
    """Whether ``config`` has the shape of another connector's config and not of ``connector``'s.

    Told apart by shape, the top-level keys (``base_url`` is ``rest``, ``endpoint`` is
    ``graphql``), never by full validation: a config of the company's own connector with a bad
    value (a query that does not parse, a secret left out to keep the stored one) is not another
    connector's, and ``pipeline.companies`` answers it with a 422 naming the key.
    """
    own = _CONFIG_MODELS.get(connector)
    if own is None or _shaped_like(own, config):
        return False
    return any(_shaped_like(model, config) for name, model in _CONFIG_MODELS.items() if name != connector)


def _shaped_like(model: type[BaseModel], config: dict[str, Any]) -> bool:
    """Every key ``config`` has is one of ``model``'s, and it has every key ``model`` requires."""
    fields = model.model_fields
    required = {name for name, field in fields.items() if field.is_required()}
    return required <= config.keys() <= fields.keys()


@router.patch(
    "/companies/{company_id}",
    response_model=CompanyOut,
    responses={**NOT_FOUND, **INVALID_CONFIG, **CONFLICT, **FORBIDDEN_UPSTREAM},
    summary="Change a company's name, connector config, feature toggles or sync switch",
)
def patch_company(company_id: CompanyIdPath, body: CompanyPatch, state: State) -> Any:
    engine = state.runtime.engine
    config = None
    if body.config is not None:
        config = body.sent_config()
        connector = get_company(engine, company_id).connector
        if _for_another_connector(connector, config):
            return error_response(
                409, "conflict", f"company {company_id} uses connector {connector!r}: send a {connector} config"
            )
    try:
        company = update_company(
            engine,
            company_id,
            name=body.name,
            config=config,
            toggles=body.toggles,
            enabled=body.enabled,
            context=state.runtime.connector_context,
            secrets=state.runtime.secrets,
        )
    except ForbiddenUpstream as exc:
        return error_response(403, "upstream_refused", str(exc))
    except ConfigError as exc:
        return error_response(422, "invalid_request", str(exc))
    return CompanyOut.of(company)
