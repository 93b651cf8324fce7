"""The declarative ``rest`` connector: any paginated JSON API, configured per company."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from connectors.base import Chunk, ConnectorContext, FetchRequest, RateLimiter, Record, ResourceSpec
from connectors.rest.config import (
    BearerAuth,
    DailyPartitions,
    HeaderAuth,
    NonePartitions,
    ParamValue,
    ResourceConfig,
    RestConfig,
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


def _make_auth(config: RestConfig, environ: Mapping[str, str]) -> SecretHeader | None:
    if isinstance(config.auth, BearerAuth):
        return SecretHeader("Authorization", prefix="Bearer ", value=config.auth.token,
                            env_var=config.auth.token_env, environ=environ)
    if isinstance(config.auth, HeaderAuth):
        return SecretHeader(config.auth.name, value=config.auth.value, env_var=config.auth.value_env,
                            environ=environ)
    return None


def check_env_name(key: str, name: str, prefix: str) -> None:
    """Raise ``ConfigError`` unless a config may name the variable ``name`` at ``key``."""
    if not name.startswith(prefix) or name.startswith("PIPELINE_"):
        raise ConfigError(
            f"rest config: {key}: variable {name} is not allowed: connector configs may only name "
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
    ) -> None:
        self.config = parse_config(config)
        self._context = context or ConnectorContext()
        self._resources: dict[str, _Resource] = {}
        for name, resource in self.config.resources.items():
            if isinstance(resource.partitions, NonePartitions):
                self._reject_partition_placeholder(name, resource)
            spec = ResourceSpec(
                name=name,
                primary_key=resource.primary_key,
                transform=resource.transform,
                policy=POLICIES[resource.transform],
                incremental_field=resource.incremental.field if resource.incremental else None,
            )
            paginator = make_paginator(
                resource.paginator, primary_key=resource.primary_key, base_url=self.config.base_url
            )
            self._resources[name] = _Resource(spec, resource, paginator)
        rate_limit = self.config.rate_limit
        self._auth = _make_auth(self.config, self._context.environ)
        self._http = HttpClient(
            self.config.base_url,
            timeout_s=self.config.timeout_s,
            retry=self.config.retry,
            auth=self._auth,
            limiter=limiter,
            requests_per_second=rate_limit.requests_per_second if rate_limit else None,
            on_response=on_response,
            network=self._context.network,
        )

    def check_admission(self, context: ConnectorContext) -> None:
        """Refuse an environment variable outside ``PIPELINE_CONNECTOR_ENV_PREFIX`` and a refused
        IP-literal ``base_url`` (host names are checked when connecting)."""
        self._check_env(context)
        try:
            context.network.check_url(self.config.base_url)
        except ForbiddenUpstream as exc:
            raise ForbiddenUpstream(f"rest config: base_url: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"rest config: base_url: {exc}") from None

    def _check_env(self, context: ConnectorContext) -> None:
        auth = self.config.auth
        if isinstance(auth, BearerAuth | HeaderAuth):
            key, name = auth.env_key
            if name is not None:
                check_env_name(f"auth.{key}", name, context.env_prefix)

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
        partitions = self._resource(resource).config.partitions
        if isinstance(partitions, DailyPartitions):
            first = today - timedelta(days=partitions.days_back)
            days = partitions.days_back + partitions.days_ahead
            return [(first + timedelta(days=offset)).isoformat() for offset in range(days)]
        return ["all"]

    def fetch(self, request: FetchRequest) -> Chunk:
        """Fetch up to ``pages_per_chunk`` pages of one partition, resuming from ``request.state``.

        Stops early, after at least one page, when another page of the slowest duration seen
        so far would end past ``request.deadline``. With ``request.since`` and an
        ``incremental`` config, ``incremental.param=since`` is sent with every page.

        A retryable failure after at least one page of this chunk ends the chunk early instead
        of raising, so the pages already read are kept; if it persists, the next call raises.

        Raises:
            UpstreamError: ``retryable=False`` for a malformed page (naming what is wrong), an
                envelope reporting failure (with the upstream's message), a 4xx; ``retryable=True``
                when retries of the first page ran out.
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
        records: list[Record] = []
        sent_before = self._http.requests_sent
        slowest = 0.0
        done = False
        for page_number in range(self.config.pages_per_chunk):
            if page_number and request.deadline is not None and time.monotonic() + slowest > request.deadline:
                break
            try:
                page_url, page_params = resource.paginator.update_request(state, dict(params), url)
            except (KeyError, TypeError, ValueError) as exc:
                # e.g. the company's paginator changed while a task was part-way through.
                raise ConnectorError(
                    f"resource {resource.spec.name!r}: the saved fetch state {state!r} does not fit its "
                    f"{resource.config.paginator.type} paginator; sync the partition again from the start"
                ) from exc
            started = time.monotonic()
            try:
                response = self._http.get(page_url, params=page_params, deadline=request.deadline,
                                          hard_deadline=request.lease_deadline)
            except UpstreamError as exc:
                if exc.retryable and page_number:
                    logger.warning(
                        "%s/%s: ending the chunk after %d pages: %s",
                        resource.spec.name,
                        request.partition,
                        page_number,
                        self._auth.scrub(str(exc)) if self._auth is not None else exc,
                    )
                    break
                raise
            slowest = max(slowest, time.monotonic() - started)
            try:
                body = self._decode(response)
                page_records = self._read_records(resource.config, body)
                state, more = resource.paginator.update_state(state, Page(response, body, page_records))
            except UpstreamError as exc:
                where = f"resource {resource.spec.name!r}, partition {request.partition!r}"
                raise UpstreamError(f"{where}, GET {response.request.url.path}: {exc}", retryable=False) from exc
            records.extend(page_records)
            if not more:
                done = True
                break
        return Chunk(records=records, state=state, done=done, requests=self._http.requests_sent - sent_before)

    def _render(self, resource: ResourceConfig, request: FetchRequest) -> tuple[str, dict[str, ParamValue]]:
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
        if request.since is not None and resource.incremental is not None:
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
    def _read_records(resource: ResourceConfig, body: Any) -> list[Record]:
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
        if resource.records is None:
            records, where = body, "the response body"
        else:
            records, where = lookup(body, resource.records), f"records path {resource.records!r}"
            if records is MISSING:
                raise UpstreamError(f"{where} is missing from the response")
        if not isinstance(records, list):
            kind = "null" if records is None else type(records).__name__
            raise UpstreamError(f"{where} is {kind}, expected a list of records")
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise UpstreamError(f"record #{index} in {where} is {type(record).__name__}, expected an object")
            if record.get(resource.primary_key) is None:
                raise UpstreamError(f"record #{index} in {where} has no primary key {resource.primary_key!r}")
        return records

    def close(self) -> None:
        self._http.close()
