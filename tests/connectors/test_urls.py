"""The URL patterns the OpenAPI document states are exactly what the config validators accept, and
every URL they admit is one the network policy can judge (no exception but ``ConfigError``); a
next link an upstream sends fails the page as an ``UpstreamError``, whatever it holds."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors import registry
from connectors.graphql.config import GraphQLConfig
from connectors.net import NetworkPolicy
from connectors.rest.config import RestConfig
from connectors.rest.paginators import LinkHeaderPaginator, Page
from connectors.urls import BASE_URL_PATTERN, ENDPOINT_PATTERN, check_base_url, check_endpoint
from errors import ConfigError, UpstreamError

POLICY = NetworkPolicy()  # the strictest: public addresses only


def schema_pattern(schema: dict[str, Any], *path: str) -> str:
    node: Any = schema
    for key in path:
        node = node[key]
    return str(node["pattern"])


def test_the_schema_states_the_pattern_each_url_validator_checks() -> None:
    rest = RestConfig.model_json_schema()
    graphql = GraphQLConfig.model_json_schema()
    assert schema_pattern(rest, "properties", "base_url") == BASE_URL_PATTERN
    assert schema_pattern(graphql, "properties", "endpoint") == ENDPOINT_PATTERN
    for auth in ("OAuth2ClientCredentials", "OAuth2RefreshToken"):
        assert schema_pattern(rest, "$defs", auth, "properties", "token_url") == ENDPOINT_PATTERN


@pytest.mark.parametrize("check", [check_base_url, check_endpoint])
@pytest.mark.parametrize("url", ["https://a.example\n", "https://user:pw@a.example/", "https://a.example/#x",
                                 "ftp://a.example/", "https://a.example:65536/", "http://[::1", "https://a b/"])
def test_a_url_the_patterns_refuse_is_refused_naming_the_rule(check: Any, url: str) -> None:
    with pytest.raises(ValueError, match=r"must be an http:// or https:// URL"):
        check(url)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(url=st.from_regex(ENDPOINT_PATTERN, fullmatch=True))
def test_every_url_the_endpoint_pattern_admits_is_accepted_and_judged_without_a_crash(url: str) -> None:
    # BASE_URL_PATTERN is ENDPOINT_PATTERN without a query, so this covers base_url too.
    assert check_endpoint(url) == url
    try:
        POLICY.check_url(url)
    except ConfigError:
        pass  # a refused IP literal: a ForbiddenUpstream naming the address


@pytest.mark.parametrize("kind", ["rest", "graphql"])
def test_a_host_label_idna_cannot_decode_passes_admission_like_any_host_name(kind: str) -> None:
    auth = {"type": "oauth2_client_credentials", "token_url": "https://xn--.example/token", "client_id": "c",
            "client_secret": "s"}
    if kind == "rest":
        config: dict[str, Any] = {"base_url": "https://xn--a.example", "auth": auth,
                                  "resources": {"r": {"path": "/r", "primary_key": "id"}}}
    else:
        config = {"endpoint": "https://xn--a.example/graphql", "auth": auth,
                  "resources": {"r": {"query": "query { r { id } }", "records": "data.r", "primary_key": "id"}}}

    assert registry.validate(kind, config) == [("auth", "client_secret")]


@pytest.mark.parametrize(("link", "problem"), [
    ('<https://xn--/x>; rel="next"', 'Link rel="next" points outside base_url'),  # was idna's IDNAError
    ('<http://[::1/x>; rel="next"', 'Link rel="next" is not a URL'),  # was httpx's InvalidURL
])
def test_a_next_link_httpx_or_idna_cannot_read_fails_the_page_as_an_upstream_error(link: str, problem: str) -> None:
    paginator = LinkHeaderPaginator("https://api.example.com")
    response = httpx.Response(200, headers={"Link": link}, request=httpx.Request("GET", "https://api.example.com/r"))
    with pytest.raises(UpstreamError, match=re.escape(problem)) as caught:
        paginator.update_state({"next_url": None}, Page(response, [], []))
    assert not caught.value.retryable
