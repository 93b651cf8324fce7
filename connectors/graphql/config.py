"""The ``graphql`` connector's config: pydantic models for the JSON a company stores.

::

    {"endpoint": "https://api.example.com/graphql", "auth": {…}, "rate_limit": {…},
     "resources": {"jobs": {
        "query": "query($first: Int!, $after: String, $day: String!) { jobs(first: $first, after: $after, day: $day)
                  { nodes { id … } pageInfo { hasNextPage endCursor } } }",
        "variables": {"day": "{partition}"},
        "partitions": {"type": "daily", "days_ahead": 7},
        "records": "data.jobs.nodes",
        "paginator": {"type": "relay", "page_info": "data.jobs.pageInfo", "first": 100},
        "primary_key": "id", "incremental": {"variable": "updatedSince", "field": "updatedAt"},
        "transform": "identity"}}}

``auth``, ``rate_limit``, ``retry``, ``timeout_s``, ``pages_per_chunk`` and ``partitions`` mean
what they mean for ``rest`` (``connectors.rest.config``). The query is parsed when the config is
validated (graphql-core): it must be one ``query`` operation that declares every variable the
config sets — the paginator's, the incremental one, and each of ``variables`` (whose string
values may use ``{partition}`` and ``{external_id}``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import graphql
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict

from connectors.jsontypes import JsonInt
from connectors.rest.config import (
    TEMPLATE_PATTERN,
    USES_PARTITION_PATTERN,
    DottedPath,
    ResourceBase,
    ResourceName,
    UpstreamConfig,
    check_templates,
    validation_problems,
)
from connectors.urls import ENDPOINT_PATTERN, check_endpoint
from errors import ConfigError

QUERY_RULE = (
    "One GraphQL `query` operation (a document that parses, with exactly one operation, a query) that"
    " declares every variable the resource sets: each key of `variables`, the paginator's (relay: `first`"
    " and `after`, offset: `offset` and `limit`, or the names configured) and the incremental `variable`."
    " No JSON Schema states a grammar: a config that breaks this rule is refused with 422 naming"
    " `resources.<name>.query`."
)

_VARIABLE_NAME = r"^[_A-Za-z][_0-9A-Za-z]*$"
VariableName = Annotated[str, StringConstraints(pattern=_VARIABLE_NAME, max_length=200)]
VariableValue = str | int | float | bool | None


class _Model(BaseModel):
    # Strict like the rest config: a config is JSON, and "5" is not a number (the schema says so too).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NonePaginatorConfig(_Model):
    """One request returns every record."""

    type: Literal["none"]


class RelayPaginatorConfig(_Model):
    """Relay cursor connections: ``first``/``after`` variables, ``pageInfo { hasNextPage endCursor }``."""

    type: Literal["relay"]
    page_info: DottedPath
    first: JsonInt = Field(default=100, ge=1, le=100_000)
    first_variable: VariableName = "first"
    after_variable: VariableName = "after"


class OffsetPaginatorConfig(_Model):
    """Offset and limit variables; the stream ends on a page shorter than ``limit``
    (or when the boolean at ``has_more`` is false)."""

    type: Literal["offset"]
    offset_variable: VariableName = "offset"
    limit_variable: VariableName = "limit"
    limit: JsonInt = Field(default=100, ge=1, le=100_000)
    has_more: DottedPath | None = None


PaginatorConfig = Annotated[
    NonePaginatorConfig | RelayPaginatorConfig | OffsetPaginatorConfig, Field(discriminator="type")
]


class IncrementalConfig(_Model):
    """Send the bookmark as ``variable``; the bookmark is the largest value of record key ``field`` seen."""

    variable: VariableName
    field: str = Field(min_length=1, max_length=200)


def _declared_variables(query: str) -> set[str]:
    try:
        document = graphql.parse(query, no_location=True)
    except graphql.GraphQLError as exc:
        raise ValueError(f"not a valid GraphQL document: {exc.message}") from None
    operations = [d for d in document.definitions if isinstance(d, graphql.OperationDefinitionNode)]
    if len(operations) != 1:
        raise ValueError(f"must hold exactly one operation, found {len(operations)}")
    if operations[0].operation != graphql.OperationType.QUERY:
        raise ValueError(f"must be a query, not a {operations[0].operation.value}")
    return {definition.variable.name.value for definition in operations[0].variable_definitions or ()}


_DAILY: JsonDict = {"const": "daily"}
_PARTITION_TEMPLATE: JsonDict = {"type": "string", "pattern": USES_PARTITION_PATTERN}
# A variable's name and value (a string is a template, as ``_variables`` checks), for the schema.
_VARIABLES: JsonDict = {
    "patternProperties": {
        _VARIABLE_NAME: {
            "anyOf": [{"type": "string", "pattern": TEMPLATE_PATTERN}, {"type": "number"}, {"type": "boolean"},
                      {"type": "null"}]
        }
    },
    "additionalProperties": False,
}


class ResourceConfig(ResourceBase):
    """One resource: its query, variables, paging, and how to read and key its records."""

    # ``{partition}`` in a variable only with daily partitions (checked by the connector; stated
    # here for the schema, as for ``rest``).
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["partitions"], "properties": {"partitions": {"properties": {"type": _DAILY}}}},
                {"properties": {"variables": {"additionalProperties": {"not": _PARTITION_TEMPLATE}}}},
            ]
        }
    )

    query: str = Field(
        min_length=1, max_length=50_000, description=QUERY_RULE,
        # An annotation (JSON Schema's content vocabulary): the string is a GraphQL document.
        json_schema_extra={"contentMediaType": "application/graphql"},
    )
    variables: dict[VariableName, VariableValue] = Field(
        default_factory=dict, json_schema_extra=_VARIABLES
    )
    records: DottedPath
    paginator: PaginatorConfig = NonePaginatorConfig(type="none")
    incremental: IncrementalConfig | None = None

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        _declared_variables(value)
        return value

    @field_validator("variables")
    @classmethod
    def _variables(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_templates(value)
        return value

    @model_validator(mode="after")
    def _query_declares_what_is_set(self) -> ResourceConfig:
        declared = _declared_variables(self.query)
        needed = dict.fromkeys(self.variables, "variables")
        if isinstance(self.paginator, RelayPaginatorConfig):
            needed |= {self.paginator.first_variable: "paginator", self.paginator.after_variable: "paginator"}
        elif isinstance(self.paginator, OffsetPaginatorConfig):
            needed |= {self.paginator.offset_variable: "paginator", self.paginator.limit_variable: "paginator"}
        if self.incremental is not None:
            needed[self.incremental.variable] = "incremental"
        missing = sorted(f"${name} ({where})" for name, where in needed.items() if name not in declared)
        if missing:
            raise ValueError(f"query: does not declare {', '.join(missing)}")
        return self


class GraphQLConfig(UpstreamConfig):
    """A company's ``graphql`` connector config (see the module docstring)."""

    # The validator's rule, stated in the schema too (not a pydantic constraint, so that a refusal
    # keeps the validator's message naming the key).
    endpoint: Annotated[
        str, Field(max_length=2_000, json_schema_extra={"pattern": ENDPOINT_PATTERN}), AfterValidator(check_endpoint)
    ]
    resources: dict[ResourceName, ResourceConfig] = Field(
        min_length=1, json_schema_extra={"additionalProperties": False}
    )


def parse_config(config: Any) -> GraphQLConfig:
    """Validate a company's ``graphql`` config.

    Raises:
        ConfigError: naming the key path of every problem, e.g.
            ``graphql config: resources.jobs.query: does not declare $after (paginator)``.
    """
    try:
        return GraphQLConfig.model_validate(config)
    except ValidationError as exc:
        # Not chained: pydantic's message echoes input values, which may be secrets.
        raise ConfigError("graphql config: " + "; ".join(validation_problems(exc))) from None
