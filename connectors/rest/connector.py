"""The declarative ``rest`` connector: any paginated JSON API, configured per company."""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from connectors.base import Chunk, ConnectorContext, FetchRequest, RateLimiter, Record, ResourceSpec
from connectors.net import NetworkPolicy
from connectors.oauth2 import MemoryTokenStore, OAuth2Auth, OAuth2ClientCredentials, OAuth2RefreshToken, TokenStore
from connectors.paging import PageResult, fetch_chunk
from connectors.rest.config import (
    BearerAuth,
    DailyPartitions,
    DetailsConfig,
    HeaderAuth,
    NonePartitions,
    ParamValue,
    ResourceBase,
    ResourceConfig,
    UpstreamConfig,
    parse_config,
    secret_paths,
    uses_placeholder,
)
from connectors.rest.http import HttpClient, body_excerpt, printable_excerpt
from connectors.rest.paginators import MISSING, Page, Paginator, lookup, make_paginator
from connectors.transforms import POLICIES
from errors import ConfigError, ConnectorError, ForbiddenUpstream, PipelineError, UpstreamError

logger = logging.getLogger(__name__)


class SecretHeader(httpx.Auth):
    """Sets one header to a secret: inline (decrypted by the worker) or an environment
    variable's value, read when each request is sent.

    No repr, log line or error message built from this object contains the value, and
    ``scrub`` takes it out of text an upstream may have echoed it into.
    """

    def __init__(
        self, header: str, *, prefix: str = "", value: SecretStr | None = None, env_var: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.header = header
        self.prefix = prefix
        self.env_var = env_var
        self._value = value
        self._environ = environ or {}

    def secret(self) -> str:
        """The header value now.

        Raises:
            ConfigError: the variable is unset or empty (named; the value never is).
        """
        if self._value is not None:
            return self.prefix + self._value.get_secret_value()
        value = self._environ.get(self.env_var or "")
        if not value:
            raise ConfigError(f"rest config: auth: environment variable {self.env_var} is not set or empty")
        return self.prefix + value

    def scrub(self, text: str) -> str:
        try:
            secret = self.secret()
        except ConfigError:
            return text
        bare = secret[len(self.prefix):]
        return text.replace(secret, "***").replace(bare, "***") if len(bare) >= 4 else text

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[self.header] = self.secret()
        yield request

    def __repr__(self) -> str:
        source = f"env_var={self.env_var!r}" if self.env_var else "inline"
        return f"SecretHeader(header={self.header!r}, {source})"


def _make_auth(config: UpstreamConfig, environ: Mapping[str, str]) -> SecretHeader | None:
    if isinstance(config.auth, BearerAuth):
        return SecretHeader("Authorization", prefix="Bearer ", value=config.auth.token,
                            env_var=config.auth.token_env, environ=environ)
    if isinstance(config.auth, HeaderAuth):
        return SecretHeader(config.auth.name, value=config.auth.value, env_var=config.auth.value_env,
                            environ=environ)
    return None


def build_auth(
    config: UpstreamConfig, *, environ: Mapping[str, str], tokens: TokenStore | None, network: NetworkPolicy
) -> tuple[SecretHeader | OAuth2Auth | None, HttpClient | None]:
    """The auth of a ``rest`` or ``graphql`` config, and the token client an OAuth2 auth owns.

    ``tokens`` is the company's token store (``MemoryTokenStore`` when none is given); token
    requests obey ``network`` like the upstream's own.
    """
    if isinstance(config.auth, OAuth2ClientCredentials | OAuth2RefreshToken):
        token_client = HttpClient(config.auth.token_url, timeout_s=config.timeout_s, retry=config.retry,
                                  network=network)
        auth = OAuth2Auth(config.auth, tokens=tokens or MemoryTokenStore(), token_client=token_client)
        return auth, token_client
    return _make_auth(config, environ), None


def resource_spec(name: str, resource: ResourceBase, incremental_field: str | None) -> ResourceSpec:
    """The ``ResourceSpec`` of a ``rest`` or ``graphql`` resource: keyed, transformed and filtered
    as its config says."""
    return ResourceSpec(
        name=name,
        primary_key=resource.primary_key,
        transform=resource.transform,
        policy=POLICIES[resource.transform],
        incremental_field=incremental_field,
    )


@dataclass(frozen=True, slots=True)
class Upstream:
    """How a declarative connector talks to its upstream: the auth, the token client an OAuth2
    auth owns (closed with the connector), and the client every request goes through."""

    auth: SecretHeader | OAuth2Auth | None
    token_client: HttpClient | None
    http: HttpClient


def connect_upstream(
    config: UpstreamConfig, url: str, *, context: ConnectorContext, limiter: RateLimiter | None,
    on_response: Callable[[int], None] | None, tokens: TokenStore | None,
) -> Upstream:
    """The ``Upstream`` of a ``rest`` or ``graphql`` config whose requests go to ``url`` (``base_url``,
    ``endpoint``), with its timeout, retries, rate limit and auth, under ``context``'s network policy."""
    auth, token_client = build_auth(config, environ=context.environ, tokens=tokens, network=context.network)
    rate_limit = config.rate_limit
    http = HttpClient(
        url,
        timeout_s=config.timeout_s,
        retry=config.retry,
        auth=auth,
        limiter=limiter,
        requests_per_second=rate_limit.requests_per_second if rate_limit else None,
        on_response=on_response,
        network=context.network,
    )
    return Upstream(auth, token_client, http)


def check_auth_admission(config: UpstreamConfig, context: ConnectorContext, *, kind: str) -> None:
    """Refuse an auth that names a variable outside the prefix, or a refused IP-literal ``token_url``."""
    auth = config.auth
    if isinstance(auth, BearerAuth | HeaderAuth):
        key, name = auth.env_key
        if name is not None:
            check_env_name(f"auth.{key}", name, context.env_prefix, kind=kind)
    elif isinstance(auth, OAuth2ClientCredentials | OAuth2RefreshToken):
        check_url_admission(auth.token_url, context, key="auth.token_url", kind=kind)


def check_url_admission(url: str, context: ConnectorContext, *, key: str, kind: str) -> None:
    """Refuse an upstream URL at ``key`` whose IP-literal host the network policy refuses.

    Raises:
        ForbiddenUpstream: naming the key, the address and the allowlist setting (the API's 403).
        ConfigError: naming the key, for a URL that cannot be sent a request.
    """
    try:
        context.network.check_url(url)
    except ForbiddenUpstream as exc:
        raise ForbiddenUpstream(f"{kind} config: {key}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{kind} config: {key}: {exc}") from None


def partition_keys(partitions: DailyPartitions | NonePartitions, today: date) -> list[str]:
    """The partition keys of a declarative resource on ``today``: ``["all"]`` for ``none``; for
    ``daily``, ISO dates from ``today - days_back`` to ``today + days_ahead - 1`` (``days_ahead``
    counts today)."""
    if isinstance(partitions, DailyPartitions):
        first = today - timedelta(days=partitions.days_back)
        days = partitions.days_back + partitions.days_ahead
        return [(first + timedelta(days=offset)).isoformat() for offset in range(days)]
    return ["all"]


def check_env_name(key: str, name: str, prefix: str, *, kind: str = "rest") -> None:
    """Raise ``ConfigError`` unless a config may name the variable ``name`` at ``key``."""
    if not name.startswith(prefix) or name.startswith("PIPELINE_"):
        raise ConfigError(
            f"{kind} config: {key}: variable {name} is not allowed: connector configs may only name "
            f"environment variables starting with {prefix} (PIPELINE_CONNECTOR_ENV_PREFIX)"
        )


@dataclass(frozen=True, slots=True)
class _Resource:
    spec: ResourceSpec
    config: ResourceConfig
    paginator: Paginator


class RestConnector:
    """A connector built from one company's ``rest`` config (see ``connectors.rest.config``).

    Parameters:
        config: the company's connector config.
        limiter: spaces requests to ``base_url`` when ``rate_limit`` is configured.
        on_response: called with the status of every upstream response (for metrics).
        context: the variables ``auth`` may read (when each request is sent), the addresses the
            client may connect to and the response cap (default: none, public only, 64 MiB).
        tokens: the company's OAuth2 token store (``connectors.oauth2``), shared by every
            worker; an in-process one when not given.

    Raises:
        ConfigError: an invalid config, naming the key path.
    """

    name = "rest"

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        limiter: RateLimiter | None = None,
        on_response: Callable[[int], None] | None = None,
        context: ConnectorContext | None = None,
        tokens: TokenStore | None = None,
    ) -> None:
        self.config = parse_config(config)
        self._context = context or ConnectorContext()
        self._resources: dict[str, _Resource] = {}
        for name, resource in self.config.resources.items():
            if isinstance(resource.partitions, NonePartitions):
                self._reject_partition_placeholder(name, resource)
            spec = resource_spec(name, resource, resource.incremental.field if resource.incremental else None)
            paginator = make_paginator(
                resource.paginator, primary_key=resource.primary_key, base_url=self.config.base_url
            )
            self._resources[name] = _Resource(spec, resource, paginator)
        upstream = connect_upstream(
            self.config, self.config.base_url, context=self._context, limiter=limiter, on_response=on_response,
            tokens=tokens,
        )
        self._auth, self._token_client, self._http = upstream.auth, upstream.token_client, upstream.http

    def check_admission(self, context: ConnectorContext) -> None:
        """Refuse an environment variable outside ``PIPELINE_CONNECTOR_ENV_PREFIX`` and a refused
        IP-literal ``base_url`` (host names are checked when connecting)."""
        self._check_env(context)
        check_url_admission(self.config.base_url, context, key="base_url", kind="rest")

    def _check_env(self, context: ConnectorContext) -> None:
        check_auth_admission(self.config, context, kind="rest")

    def secret_paths(self) -> list[tuple[str | int, ...]]:
        return secret_paths(self.config)

    @staticmethod
    def _reject_partition_placeholder(name: str, resource: ResourceConfig) -> None:
        templates = {"path": resource.path} | {
            f"params.{key}": value for key, value in resource.params.items() if isinstance(value, str)
        }
        for key, template in templates.items():
            if uses_placeholder(template, "partition"):
                raise ConfigError(
                    f"rest config: resources.{name}.{key}: uses {{partition}} but partitions.type is 'none'"
                )

    def resources(self) -> Sequence[ResourceSpec]:
        return [resource.spec for resource in self._resources.values()]

    def _resource(self, name: str) -> _Resource:
        try:
            return self._resources[name]
        except KeyError:
            offered = ", ".join(self._resources)
            raise ConnectorError(f"connector 'rest' has no resource {name!r} (offers: {offered})") from None

    def partitions(self, resource: str, today: date) -> list[str]:
        """``["all"]`` for ``none``; for ``daily``, ISO dates from ``today - days_back`` to
        ``today + days_ahead - 1`` (``days_ahead`` counts today)."""
        return partition_keys(self._resource(resource).config.partitions, today)

    def fetch(self, request: FetchRequest) -> Chunk:
        """Fetch up to ``pages_per_chunk`` pages of one partition, resuming from ``request.state``.

        Stops early, after at least one page, when another page of the slowest duration seen
        so far would end past ``request.deadline`` (see ``connectors.paging.fetch_chunk``). With
        ``request.since`` and an ``incremental`` config, ``incremental.param=since`` is sent
        with every page. With ``details``, each page of ids is followed by its detail requests,
        and ``pages_per_chunk`` bounds the requests of both kinds.

        A retryable failure after at least one page of this chunk ends the chunk early instead
        of raising, so the pages already read are kept; if it persists, the next call raises.

        Raises:
            UpstreamError: ``retryable=False`` for a malformed page (naming what is wrong), an
                envelope reporting failure (with the upstream's message), a 4xx; ``retryable=True``
                when retries of the first page ran out. ``UpstreamAuthError`` when the OAuth2
                grant was refused.
            ConfigError: a secret's environment variable is unset, or ``{external_id}`` is used
                and the company has none.
        """
        resource = self._resource(request.resource)
        self._check_env(self._context)  # a config stored before the prefix rule still obeys it
        if self._auth is not None:
            self._auth.secret()  # a missing secret fails before a rate-limit slot is spent
        try:
            return self._fetch(resource, request)
        except PipelineError as exc:
            if self._auth is not None:
                # An upstream may echo the credential it was sent into its error body.
                exc.args = (self._auth.scrub(str(exc)),)
            raise

    def _fetch(self, resource: _Resource, request: FetchRequest) -> Chunk:
        state = dict(request.state) if request.state is not None else resource.paginator.initial_state()
        url, params = self._render(resource.config, request)
        details = resource.config.details
        detail_url, detail_params = self._render_details(details, request) if details else ("", {})

        def fetch_page(state: dict[str, Any], deadline: float | None) -> PageResult:
            try:
                page_url, page_params = resource.paginator.update_request(state, dict(params), url)
            except (KeyError, TypeError, ValueError) as exc:
                # e.g. the company's paginator changed while a task was part-way through.
                raise ConnectorError(
                    f"resource {resource.spec.name!r}: the saved fetch state {state!r} does not fit its "
                    f"{resource.config.paginator.type} paginator; sync the partition again from the start"
                ) from exc
            response = self._http.get(page_url, params=page_params, deadline=deadline,
                                      hard_deadline=request.lease_deadline)
            try:
                body = self._decode(response)
                key = (details.list_id or details.join) if details else resource.config.primary_key
                page_records = self._read_records(resource.config, body, key=key,
                                                  records_path=resource.config.records)
                new_state, more = resource.paginator.update_state(state, Page(response, body, page_records))
            except UpstreamError as exc:
                where = f"resource {resource.spec.name!r}, partition {request.partition!r}"
                raise UpstreamError(f"{where}, GET {response.request.url.path}: {exc}", retryable=False) from exc
            if details is not None:
                page_records = self._fetch_details(
                    resource, details, page_records, detail_url, detail_params, request, deadline
                )
            return PageResult(page_records, new_state, more)

        return fetch_chunk(
            fetch_page,
            state,
            max_pages=self.config.pages_per_chunk,
            max_requests=self.config.pages_per_chunk if details else None,
            deadline=request.deadline,
            requests_sent=lambda: self._http.requests_sent,
            label=f"{resource.spec.name}/{request.partition}",
            scrub=self._auth.scrub if self._auth is not None else None,
        )

    def _fetch_details(
        self,
        resource: _Resource,
        details: DetailsConfig,
        listed: list[Record],
        url: str,
        params: dict[str, ParamValue],
        request: FetchRequest,
        deadline: float | None,
    ) -> list[Record]:
        """The detail records of one listed page, ``details.batch`` ids per request, in listing order."""
        ids = [str(lookup(record, details.list_id or details.join)) for record in listed]
        found: dict[str, Record] = {}
        for start in range(0, len(ids), details.batch):
            batch = ids[start : start + details.batch]
            response = self._http.get(url, params={**params, details.ids_param: details.separator.join(batch)},
                                      deadline=deadline, hard_deadline=request.lease_deadline)
            try:
                body = self._decode(response)
                records = self._read_records(resource.config, body, key=resource.config.primary_key,
                                             records_path=details.records)
                for index, record in enumerate(records):
                    joined = record.get(details.join)
                    if joined is None:
                        raise UpstreamError(f"detail record #{index} has no join key {details.join!r}")
                    found[str(joined)] = record
            except UpstreamError as exc:
                where = f"resource {resource.spec.name!r}, partition {request.partition!r}"
                raise UpstreamError(f"{where}, GET {response.request.url.path}: {exc}", retryable=False) from exc
        missing = [item for item in ids if item not in found]
        if missing:
            logger.warning("%s/%s: %d listed ids have no detail record (e.g. %s); skipped",
                           resource.spec.name, request.partition, len(missing), missing[0])
        return [found[item] for item in dict.fromkeys(ids) if item in found]

    def _render_details(self, details: DetailsConfig, request: FetchRequest) -> tuple[str, dict[str, ParamValue]]:
        detail = ResourceConfig(path=details.path, params=details.params, primary_key="-")
        return self._render(detail, request, incremental=False)

    def _render(
        self, resource: ResourceConfig, request: FetchRequest, *, incremental: bool = True
    ) -> tuple[str, dict[str, ParamValue]]:
        values = {"partition": request.partition, "external_id": request.external_id}

        def render(template: str, *, in_path: bool) -> str:
            for name, value in values.items():
                if value is None and uses_placeholder(template, name):
                    raise ConfigError(f"resource {request.resource!r} uses {{{name}}} but the company has none")
            quoted = {k: quote(v, safe="") if in_path else v for k, v in values.items() if v is not None}
            return template.format(**quoted)

        url = self.config.base_url + render(resource.path, in_path=True)
        params: dict[str, ParamValue] = {
            key: render(value, in_path=False) if isinstance(value, str) else value
            for key, value in resource.params.items()
        }
        if incremental and request.since is not None and resource.incremental is not None:
            params[resource.incremental.param] = request.since
        return url, params

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            content_type = response.headers.get("Content-Type", "no Content-Type")
            raise UpstreamError(
                f"the response is not JSON ({printable_excerpt(content_type)}): {body_excerpt(response)}"
            ) from None

    @staticmethod
    def _read_records(
        resource: ResourceConfig, body: Any, *, key: str, records_path: str | None
    ) -> list[Record]:
        """The records at ``records_path`` in ``body`` (``None``: the body), each an object with a
        non-null ``key`` (the primary key, or the dotted path of a listed id)."""
        envelope = resource.envelope
        if envelope is not None:
            success = lookup(body, envelope.success)
            if success is MISSING:
                raise UpstreamError(f"envelope key {envelope.success!r} is missing from the response")
            if success is not True:
                message = lookup(body, envelope.message) if envelope.message else MISSING
                # Bounded and printable: what answered must not be able to fill task errors.
                detail = "no message" if message is MISSING or message is None else printable_excerpt(str(message))
                raise UpstreamError(f"the upstream reported failure ({envelope.success}={success!r}): {detail}")
        if records_path is None:
            records, where = body, "the response body"
        else:
            records, where = lookup(body, records_path), f"records path {records_path!r}"
            if records is MISSING:
                raise UpstreamError(f"{where} is missing from the response")
        if not isinstance(records, list):
            kind = "null" if records is None else type(records).__name__
            raise UpstreamError(f"{where} is {kind}, expected a list of records")
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise UpstreamError(f"record #{index} in {where} is {type(record).__name__}, expected an object")
            found = record.get(key) if key == resource.primary_key else lookup(record, key)
            if found is MISSING or found is None:
                noun = "primary key" if key == resource.primary_key else "id at"
                raise UpstreamError(f"record #{index} in {where} has no {noun} {key!r}")
        return records

    def close(self) -> None:
        self._http.close()
        if self._token_client is not None:
            self._token_client.close()
