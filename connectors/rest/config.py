"""The ``rest`` connector's config: pydantic models for the JSON a company stores.

Everything is validated when a company is added or updated; a bad config raises
``ConfigError`` naming the key path, e.g. ``resources.schedule.paginator.limit``. A secret is
either inline (``auth.token``, ``auth.value``: every field typed ``SecretValue``, which
``pipeline.secrets`` encrypts before the config is stored and shows as ``"***"``), or named by
an environment variable (``token_env``, ``value_env``) that must start with
``PIPELINE_CONNECTOR_ENV_PREFIX`` — checked when the config is stored and when it is used.

Beyond the shape in issue 3, the config accepts (all optional):

- ``pages_per_chunk`` (default 10): upstream pages fetched per ``fetch`` call, i.e. per chunk.
- ``retry``: ``{"max_attempts": 5, "backoff_s": 0.5, "max_backoff_s": 30, "max_wait_s": 120}``.
- ``paginator.limit_param`` / ``paginator.limit`` for ``cursor`` (Stripe's ``limit``).
- ``paginator.has_more`` for ``page`` (as for ``offset``).
- ``records`` may be omitted: the response body itself is then the list of records.
- ``details`` (issue 15): list-then-detail fetches, see ``DetailsConfig``. With it, a chunk's
  ``pages_per_chunk`` counts requests of both kinds: a chunk ends before a page whose requests
  (the listing plus its detail batches) would exceed it, after at least one page.
- ``auth`` may be OAuth2 (``connectors.oauth2``): ``oauth2_client_credentials`` or
  ``oauth2_refresh_token``.

Defaults: ``auth`` none, ``timeout_s`` 30, no ``rate_limit``, ``partitions`` none, ``paginator``
none, ``params`` empty, no ``envelope``, no ``incremental``, ``transform`` identity. The
incremental ``field`` and ``primary_key`` are top-level record keys; other paths are dotted.
"""

from __future__ import annotations

import string
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic_core import ErrorDetails

from connectors.jsontypes import JsonInt, integral
from connectors.oauth2 import OAuth2ClientCredentials, OAuth2RefreshToken
from connectors.transforms import TRANSFORMS
from connectors.urls import BASE_URL_PATTERN, check_base_url
from errors import ConfigError

PLACEHOLDERS = frozenset({"partition", "external_id"})

# The validators below, as JSON Schema patterns, so that the API's OpenAPI document describes
# exactly what is accepted (a client generated from it can build every valid config).
TEMPLATE_PATTERN = r"^(?:[^{}]|\{\{|\}\}|\{(?:partition|external_id)\})*$"
"""A ``str.format`` template whose only fields are ``{partition}`` and ``{external_id}``."""
USES_PARTITION_PATTERN = r"^(?:[^{}]|\{\{|\}\}|\{external_id\})*\{partition\}"
"""A (valid) template that uses ``{partition}``."""
_PATH_PATTERN = "^/" + TEMPLATE_PATTERN.removeprefix("^")
_PARAMS_SCHEMA: JsonDict = {
    "additionalProperties": {
        "anyOf": [{"type": "string", "pattern": TEMPLATE_PATTERN}, {"type": "number"}, {"type": "boolean"}]
    }
}
_DAILY: JsonDict = {"const": "daily"}
_PARTITION_TEMPLATE: JsonDict = {"type": "string", "pattern": USES_PARTITION_PATTERN}
_TRANSFORM_NAMES: list[JsonValue] = [*sorted(TRANSFORMS)]

_ENV_VAR = ENV_VAR_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_HEADER = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
# Not starting with '.': '.', '..' and '.x' would be reserved blob key segments (defect 4).
_RESOURCE = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$"
_DOTTED = r"^[^.]+(\.[^.]+)*$"
_PATTERN_MEANING = {
    _ENV_VAR: "must be the NAME of an environment variable (letters, digits, '_')",
    _HEADER: "must be an HTTP header name",
    _RESOURCE: "a resource name may contain only letters, digits, '_', '.' and '-', and must not start with '.'",
    _DOTTED: "must be a dotted path such as 'data' or 'result.items'",
}

EnvVarName = Annotated[str, StringConstraints(pattern=_ENV_VAR, max_length=200)]
HeaderName = Annotated[str, StringConstraints(pattern=_HEADER, max_length=200)]
# Resource names become part of blob keys and URLs: keep them to a safe alphabet.
ResourceName = Annotated[str, StringConstraints(pattern=_RESOURCE, max_length=100)]
ParamName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
DottedPath = Annotated[str, StringConstraints(pattern=_DOTTED, max_length=500)]
ParamValue = str | int | float | bool
# A secret: encrypted at rest, write-only. Any config field of this type is found by
# ``secret_paths`` and sealed by ``pipeline.secrets`` — an auth kind added later (OAuth2's
# client_secret, refresh_token) only has to type its fields with it.
SecretValue = Annotated[SecretStr, Field(min_length=1, max_length=10_000)]


class _Model(BaseModel):
    # Strict: a config is JSON, and "5" is not a number nor 0 a boolean (the schema says so too).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _one_of(inline: str, env: str) -> JsonDict:
    """``_exactly_one`` as JSON Schema: one of the two keys set (a string), the other null or absent."""
    return {
        "anyOf": [
            {"required": [inline], "properties": {inline: {"type": "string"}, env: {"type": "null"}}},
            {"required": [env], "properties": {env: {"type": "string"}, inline: {"type": "null"}}},
        ]
    }


def _exactly_one(inline: SecretStr | None, env: str | None, names: tuple[str, str]) -> None:
    if (inline is None) == (env is None):
        raise ValueError(f"give exactly one of {names[0]} (the secret, stored encrypted) and {names[1]}")


class BearerAuth(_Model):
    """``Authorization: Bearer <token>``; the token inline or from the variable ``token_env``."""

    model_config = ConfigDict(json_schema_extra=_one_of("token", "token_env"))

    type: Literal["bearer"]
    token: SecretValue | None = None
    token_env: EnvVarName | None = None

    @model_validator(mode="after")
    def _one_source(self) -> BearerAuth:
        _exactly_one(self.token, self.token_env, ("token", "token_env"))
        return self

    @property
    def env_key(self) -> tuple[str, str | None]:
        return "token_env", self.token_env


class HeaderAuth(_Model):
    """``<name>: <value>``, e.g. ``X-Api-Key``; the value inline or from the variable ``value_env``."""

    model_config = ConfigDict(json_schema_extra=_one_of("value", "value_env"))

    type: Literal["header"]
    name: HeaderName
    value: SecretValue | None = None
    value_env: EnvVarName | None = None

    @model_validator(mode="after")
    def _one_source(self) -> HeaderAuth:
        _exactly_one(self.value, self.value_env, ("value", "value_env"))
        return self

    @property
    def env_key(self) -> tuple[str, str | None]:
        return "value_env", self.value_env


class NoAuth(_Model):
    type: Literal["none"]


AuthConfig = Annotated[
    BearerAuth | HeaderAuth | NoAuth | OAuth2ClientCredentials | OAuth2RefreshToken, Field(discriminator="type")
]


class RateLimitConfig(_Model):
    """Requests per second to this ``base_url``, shared by every worker on every host."""

    requests_per_second: float = Field(gt=0, le=10_000)


class RetryConfig(_Model):
    """Retries of one upstream request on connection errors, timeouts, 429 and 5xx.

    The n-th retry waits ``Retry-After`` when the upstream sends it, otherwise a random time in
    ``[0, min(max_backoff_s, backoff_s * 2**(n-1))]`` (exponential backoff with full jitter).
    ``max_wait_s`` bounds the total wait for one request.
    """

    max_attempts: JsonInt = Field(default=5, ge=1, le=20)
    backoff_s: float = Field(default=0.5, gt=0, le=60)
    max_backoff_s: float = Field(default=30.0, gt=0, le=600)
    max_wait_s: float = Field(default=120.0, ge=0, le=1_800)


class NonePartitions(_Model):
    """One partition, ``"all"``."""

    type: Literal["none"]


class DailyPartitions(_Model):
    """One partition per ISO date: ``days_back`` days before today, today, and the days after.

    ``days_ahead`` counts today: ``{"days_ahead": 7, "days_back": 0}`` is today and the next six
    days; ``{"days_ahead": 1, "days_back": 2}`` is the day before yesterday, yesterday and today.
    """

    # The schema states the model validator below: not (days_ahead == 0 and days_back in (0, absent)).
    model_config = ConfigDict(
        json_schema_extra={
            "not": {"required": ["days_ahead"], "properties": {"days_ahead": {"const": 0}, "days_back": {"const": 0}}}
        }
    )

    type: Literal["daily"]
    days_ahead: JsonInt = Field(default=7, ge=0, le=366)
    days_back: JsonInt = Field(default=0, ge=0, le=366)

    @model_validator(mode="after")
    def _at_least_one_day(self) -> DailyPartitions:
        if self.days_ahead + self.days_back < 1:
            raise ValueError("days_ahead + days_back must be at least 1")
        return self


PartitionsConfig = Annotated[NonePartitions | DailyPartitions, Field(discriminator="type")]


class NonePaginatorConfig(_Model):
    """A single request returns every record."""

    type: Literal["none"]


class OffsetPaginatorConfig(_Model):
    """``offset``/``limit`` parameters (Close: ``_skip``/``_limit``).

    The stream ends when ``has_more`` (a dotted path in the body) is false or, without it, on a
    page shorter than ``limit``.
    """

    type: Literal["offset"]
    offset_param: ParamName = "offset"
    limit_param: ParamName = "limit"
    limit: JsonInt = Field(default=100, ge=1, le=100_000)
    has_more: DottedPath | None = None


class PagePaginatorConfig(_Model):
    """Page number and size parameters; ends like ``offset``."""

    type: Literal["page"]
    page_param: ParamName = "page"
    size_param: ParamName = "pageSize"
    size: JsonInt = Field(default=100, ge=1, le=100_000)
    first_page: JsonInt = Field(default=1, ge=0)
    has_more: DottedPath | None = None


class CursorPaginatorConfig(_Model):
    """An opaque cursor sent as ``cursor_param``.

    The next cursor is read at ``cursor_path`` in the body, or, when that is null, it is the
    last record's primary key (Stripe's ``starting_after``). The stream ends when ``has_more``
    is false or, without it, when there is no next cursor or the page is empty.
    """

    # The schema states ``_limit_needs_param``: both set, or both null or absent.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["limit", "limit_param"], "properties": {"limit": {"type": "integer"},
                                                                      "limit_param": {"type": "string"}}},
                {"properties": {"limit": {"type": "null"}, "limit_param": {"type": "null"}}},
            ]
        }
    )

    type: Literal["cursor"]
    cursor_param: ParamName = "starting_after"
    cursor_path: DottedPath | None = None
    has_more: DottedPath | None = None
    limit_param: ParamName | None = None
    limit: Annotated[int, Field(ge=1, le=100_000), BeforeValidator(integral)] | None = None

    @model_validator(mode="after")
    def _limit_needs_param(self) -> CursorPaginatorConfig:
        if (self.limit is None) != (self.limit_param is None):
            raise ValueError("limit and limit_param go together: set both or neither")
        return self


class LinkPaginatorConfig(_Model):
    """RFC 8288 ``Link: <url>; rel="next"`` headers (GitHub style); no ``next`` ends the stream."""

    type: Literal["link"]


PaginatorConfig = Annotated[
    NonePaginatorConfig | OffsetPaginatorConfig | PagePaginatorConfig | CursorPaginatorConfig | LinkPaginatorConfig,
    Field(discriminator="type"),
]


class EnvelopeConfig(_Model):
    """An HTTP 200 whose ``success`` key is not ``true`` is an error carrying ``message``."""

    success: DottedPath
    message: DottedPath | None = None


class IncrementalConfig(_Model):
    """Send the bookmark as ``param``; the bookmark is the largest value of record key ``field`` seen."""

    param: ParamName
    field: str = Field(min_length=1, max_length=200)


def _check_template(value: str) -> str:
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"{exc} (write a literal brace as {{{{ or }}}})") from None
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in PLACEHOLDERS or spec or conversion:
            allowed = ", ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS))
            raise ValueError(f"unknown placeholder {{{name}}}; allowed: {allowed}")
    return value


def check_templates(values: dict[str, Any]) -> None:
    """``_check_template`` on each string of ``values`` (``params``, graphql ``variables``),
    a ``ValueError`` naming the key."""
    for name, item in values.items():
        if isinstance(item, str):
            try:
                _check_template(item)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None


def uses_placeholder(template: str, name: str) -> bool:
    """Whether ``template`` (already validated) contains ``{name}``."""
    return any(field == name for _literal, field, _spec, _conv in string.Formatter().parse(template))


class DetailsConfig(_Model):
    """List-then-detail: each listed page gives ids; their records come from ``path`` in batches.

    A detail request is ``GET base_url + path`` with ``ids_param`` set to up to ``batch`` ids
    joined by ``separator`` (YouTube's ``/videos?id=a,b,c``), plus ``params``. The records
    published are the detail records (read at ``records``, keyed by the resource's
    ``primary_key``), in the order of the listing; ``join`` is the key of a detail record that
    holds the id asked for, and ``list_id`` the dotted path of the id in a listed record
    (default: ``join``). An id the upstream no longer details is skipped with a warning.
    """

    path: str = Field(min_length=1, max_length=2_000, json_schema_extra={"pattern": _PATH_PATTERN})
    ids_param: ParamName
    batch: JsonInt = Field(default=50, ge=1, le=1_000)
    records: DottedPath | None = None
    join: str = Field(min_length=1, max_length=200)
    list_id: DottedPath | None = None
    separator: str = Field(default=",", min_length=1, max_length=5)
    params: dict[ParamName, ParamValue] = Field(default_factory=dict)  # not templates: sent as written

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/' (it is appended to base_url)")
        return _check_template(value)


class ResourceBase(_Model):
    """What a resource of the ``rest`` and ``graphql`` connectors shares: its partitions, how its
    records are keyed, and the transform that shapes the published document."""

    partitions: PartitionsConfig = NonePartitions(type="none")
    primary_key: str = Field(min_length=1, max_length=200)
    transform: str = Field(default="identity", json_schema_extra={"enum": _TRANSFORM_NAMES})

    @field_validator("transform")
    @classmethod
    def _transform(cls, value: str) -> str:
        if value not in TRANSFORMS:
            raise ValueError(f"unknown transform {value!r}; known: {', '.join(sorted(TRANSFORMS))}")
        return value


class ResourceConfig(ResourceBase):
    """One resource: where to fetch it, how to page through it, how to read and key its records."""

    # ``{partition}`` only with daily partitions (checked by the connector; stated here for the schema).
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["partitions"], "properties": {"partitions": {"properties": {"type": _DAILY}}}},
                {
                    "properties": {
                        "path": {"not": {"pattern": USES_PARTITION_PATTERN}},
                        "params": {"additionalProperties": {"not": _PARTITION_TEMPLATE}},
                    }
                },
            ]
        }
    )

    path: str = Field(min_length=1, max_length=2_000, json_schema_extra={"pattern": _PATH_PATTERN})
    params: dict[ParamName, ParamValue] = Field(default_factory=dict, json_schema_extra=_PARAMS_SCHEMA)
    records: DottedPath | None = None
    envelope: EnvelopeConfig | None = None
    paginator: PaginatorConfig = NonePaginatorConfig(type="none")
    incremental: IncrementalConfig | None = None
    details: DetailsConfig | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/' (it is appended to base_url)")
        return _check_template(value)

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("must be an object of query parameters")
        for name, item in value.items():
            if not isinstance(item, str | int | float | bool):
                raise ValueError(f"{name}: must be a string, number or boolean")
        check_templates(value)
        return value


class UpstreamConfig(_Model):
    """What the ``rest`` and ``graphql`` configs share: how to authenticate to the upstream, how
    long to wait for it, how fast to ask, how to retry, and how many pages make a chunk."""

    auth: AuthConfig = NoAuth(type="none")
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    rate_limit: RateLimitConfig | None = None
    retry: RetryConfig = RetryConfig()
    pages_per_chunk: JsonInt = Field(default=10, ge=1, le=10_000)


class RestConfig(UpstreamConfig):
    """A company's ``rest`` connector config (see the module docstring for the keys)."""

    base_url: str = Field(max_length=2_000, json_schema_extra={"pattern": BASE_URL_PATTERN})
    resources: dict[ResourceName, ResourceConfig] = Field(
        min_length=1, json_schema_extra={"additionalProperties": False}
    )

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return check_base_url(value).rstrip("/")


def secret_paths(model: BaseModel, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """The key paths of every ``SecretStr`` value in a validated config, e.g. ``[("auth", "token")]``."""
    found: list[tuple[str | int, ...]] = []

    def visit(value: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(value, SecretStr):
            found.append(path)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                visit(getattr(value, name), (*path, name))
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, (*path, key))
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                visit(item, (*path, index))

    visit(model, prefix)
    return found


# Where pydantic puts the tag of a discriminated union into an error location (``None``
# matches any resource name): ``resources.s.paginator.offset.limit`` is reported as
# ``resources.s.paginator.limit``, the key the user wrote.
_TAGGED: tuple[tuple[str | None, ...], ...] = (
    ("auth",),
    ("resources", None, "partitions"),
    ("resources", None, "paginator"),
)


def _is_tagged(parts: list[str]) -> bool:
    return any(
        len(parts) == len(prefix) and all(p is None or p == q for p, q in zip(prefix, parts, strict=True))
        for prefix in _TAGGED
    )


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    skip_tag = False
    for part in loc:
        if skip_tag:
            skip_tag = False
            continue
        if part == "[key]":
            continue
        parts.append(str(part))
        skip_tag = _is_tagged(parts)
    return ".".join(parts)


def _describe(error: ErrorDetails) -> str:
    path = _key_path(error["loc"])
    kind = error["type"]
    context = error.get("ctx") or {}
    message = error["msg"]
    if kind == "union_tag_invalid":
        path += ".type"
        message = f"{context.get('tag')!r} is not one of {context.get('expected_tags')}"
    elif kind == "union_tag_not_found":
        path += ".type"
        message = "required"
    elif kind == "value_error":
        message = str(context.get("error", message))
    elif kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "string_pattern_mismatch":
        message = _PATTERN_MEANING.get(str(context.get("pattern")), message)
    return f"{path or 'config'}: {message}"


def validation_problems(exc: ValidationError) -> list[str]:
    """One ``key.path: problem`` line per error, input values never echoed (they may be secrets)."""
    return [_describe(error) for error in exc.errors(include_url=False, include_input=False)]


def parse_config(config: Any) -> RestConfig:
    """Validate a company's ``rest`` config.

    Raises:
        ConfigError: naming the key path of every problem, e.g.
            ``rest config: resources.schedule.paginator.type: 'pages' is not one of ...``.
    """
    try:
        return RestConfig.model_validate(config)
    except ValidationError as exc:
        problems = validation_problems(exc)
        # Not chained: pydantic's own message echoes input values, and a token pasted into
        # ``token_env`` by mistake must not reach a log through the traceback.
        raise ConfigError("rest config: " + "; ".join(problems)) from None
