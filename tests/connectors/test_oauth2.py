"""OAuth2 auth of the declarative connectors against a provider that rotates refresh tokens."""

from __future__ import annotations

from typing import Any

import pytest

from connectors import registry
from connectors.base import FetchRequest
from connectors.graphql import GraphQLConnector
from connectors.oauth2 import MemoryTokenStore, UpstreamAuthError
from connectors.rest import RestConnector
from errors import ConfigError, UpstreamError
from tests.connectors.support import drain, loopback_connector, records_of
from tests.fakes.graphql_api import GraphQLApi
from tests.fakes.oauth2 import OAuth2Provider
from tests.fakes.upstreams import StripeApi
from tests.services import wait_for

CLIENT_ID, CLIENT_SECRET = "sync-pipeline", "cs_live_client-secret-never-logged"


def refresh_auth(provider: OAuth2Provider, refresh_token: str, **extra: Any) -> dict[str, Any]:
    return {"type": "oauth2_refresh_token", "token_url": provider.token_url, "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET, "refresh_token": refresh_token, **extra}


def stripe_config(api: StripeApi, auth: dict[str, Any], *, limit: int = 5) -> dict[str, Any]:
    return {
        "base_url": api.base_url, "auth": auth, "pages_per_chunk": 2, "retry": {"max_attempts": 2, "backoff_s": 0.01},
        "resources": {"customers": {
            "path": "/v1/customers", "records": "data", "primary_key": "id",
            "paginator": {"type": "cursor", "has_more": "has_more", "limit_param": "limit", "limit": limit},
        }},
    }


@pytest.fixture
def provider(oauth_provider: OAuth2Provider) -> OAuth2Provider:
    oauth_provider.register_client(CLIENT_ID, CLIENT_SECRET)
    oauth_provider.uses_per_token = 3
    return oauth_provider


def token_requests(provider: OAuth2Provider) -> list[dict[str, str]]:
    from urllib.parse import parse_qsl

    return [dict(parse_qsl(entry.body.decode())) for entry in provider.requests]


def test_rotating_refresh_tokens_are_followed_one_refresh_per_expiry(
    provider: OAuth2Provider, stripe_api: StripeApi
) -> None:
    stripe_api.require_oauth(provider)
    tokens = MemoryTokenStore()
    config = stripe_config(stripe_api, refresh_auth(provider, provider.issue_grant(CLIENT_ID)), limit=2)

    chunks = drain(config, "customers", tokens=tokens, kind=RestConnector)

    assert [r["id"] for r in records_of(chunks)] == [f"cus_{i:06d}" for i in range(25)]
    assert not provider.revoked()
    assert provider.expiries >= 3
    assert provider.refreshes == provider.expiries + 1, "the first exchange, then one refresh per expiry"
    presented = [form["refresh_token"] for form in token_requests(provider)]
    assert len(presented) == len(set(presented)), "a spent refresh token was presented again"


def test_client_credentials_serve_a_graphql_connector(provider: OAuth2Provider, graphql_api: GraphQLApi) -> None:
    graphql_api.require_oauth(provider)
    config = {
        "endpoint": f"{graphql_api.base_url}/graphql", "pages_per_chunk": 3,
        "auth": {"type": "oauth2_client_credentials", "token_url": provider.token_url, "client_id": CLIENT_ID,
                 "client_secret": CLIENT_SECRET, "scope": "jobs:read", "client_auth": "post"},
        "resources": {"items": {
            "query": "query($skip: Int!, $first: Int!) { items(skip: $skip, first: $first) { id } }",
            "records": "data.items", "primary_key": "id",
            "paginator": {"type": "offset", "offset_variable": "skip", "limit_variable": "first", "limit": 2},
        }},
    }

    chunks = drain(config, "items", kind=GraphQLConnector, tokens=MemoryTokenStore())

    assert len(records_of(chunks)) == 25
    forms = token_requests(provider)
    assert {form["grant_type"] for form in forms} == {"client_credentials"}
    assert all(form["scope"] == "jobs:read" and form["client_secret"] == CLIENT_SECRET for form in forms)
    assert provider.refreshes == provider.expiries + 1


def test_a_token_expiring_within_60_s_is_refreshed_before_it_is_used(
    provider: OAuth2Provider, stripe_api: StripeApi
) -> None:
    provider.uses_per_token = 1_000
    provider.expires_in_s = 62
    stripe_api.require_oauth(provider)
    tokens = MemoryTokenStore()
    config = stripe_config(stripe_api, refresh_auth(provider, provider.issue_grant(CLIENT_ID)), limit=100)
    drain(config, "customers", tokens=tokens)
    first = tokens.current(loopback_connector(config, tokens=tokens)._auth.grant)  # type: ignore[union-attr]
    assert first is not None and first.fresh()
    wait_for(lambda: _aged_out(tokens, config), timeout=10, what="the cached token to come within 60 s of its expiry")

    drain(config, "customers", tokens=tokens)

    assert provider.refreshes == 2 and provider.expiries == 0
    assert [entry.status for entry in stripe_api.requests] == [200, 200], "no request was sent with the old token"


def _aged_out(tokens: MemoryTokenStore, config: dict[str, Any]) -> bool:
    connector = loopback_connector(config, tokens=tokens)
    try:
        current = tokens.current(connector._auth.grant)  # type: ignore[union-attr]
    finally:
        connector.close()
    return current is not None and not current.fresh()


def test_invalid_grant_fails_with_upstream_auth_and_stops_asking(
    provider: OAuth2Provider, stripe_api: StripeApi
) -> None:
    stripe_api.require_oauth(provider)
    spent = provider.issue_grant(CLIENT_ID)
    tokens = MemoryTokenStore()
    config = stripe_config(stripe_api, refresh_auth(provider, spent))
    drain(config, "customers", tokens=tokens)
    # A copy of the config elsewhere still holds the first refresh token: reusing it revokes the grant.
    with pytest.raises(UpstreamAuthError) as caught:
        drain(config, "customers", tokens=MemoryTokenStore())
    assert provider.revoked()
    assert "upstream_auth" in str(caught.value) and "must be re-authorized" in str(caught.value)
    assert not caught.value.retryable
    asked = len(provider.requests)

    provider.expire_all()
    with pytest.raises(UpstreamAuthError):
        drain(config, "customers", tokens=tokens)
    with pytest.raises(UpstreamAuthError):
        drain(config, "customers", tokens=tokens)
    assert len(provider.requests) == asked + 1, "a refused grant is not presented again"

    # Re-authorized: a new refresh token in the config starts a new grant.
    config = stripe_config(stripe_api, refresh_auth(provider, provider.issue_grant(CLIENT_ID)))
    assert len(records_of(drain(config, "customers", tokens=tokens))) == 25


def test_a_401_with_a_fresh_token_is_refreshed_once_then_fails(provider: OAuth2Provider, stripe_api: StripeApi) -> None:
    stripe_api.require_header("X-Never", "sent")
    config = stripe_config(stripe_api, refresh_auth(provider, provider.issue_grant(CLIENT_ID)))

    with pytest.raises(UpstreamError) as caught:
        drain(config, "customers", tokens=MemoryTokenStore())

    assert caught.value.status == 401 and not caught.value.retryable
    assert provider.refreshes == 2, "the first exchange, then exactly one refresh after the 401"
    assert [entry.status for entry in stripe_api.requests] == [401, 401]


def test_secrets_never_reach_errors_or_reprs(provider: OAuth2Provider, stripe_api: StripeApi) -> None:
    refresh_token = provider.issue_grant(CLIENT_ID)
    config = stripe_config(stripe_api, refresh_auth(provider, refresh_token, client_secret="wrong-secret-value"))
    connector = loopback_connector(config, tokens=MemoryTokenStore())
    try:
        with pytest.raises(UpstreamError) as caught:
            connector.fetch(FetchRequest(company_id=1, external_id=None, resource="customers", partition="all"))
        shown = str(caught.value) + repr(vars(connector)) + repr(connector.config)
    finally:
        connector.close()
    assert "invalid_client" in str(caught.value)
    assert "wrong-secret-value" not in shown and refresh_token not in shown


@pytest.mark.parametrize(
    ("auth", "problem"),
    [
        ({"type": "oauth2_refresh_token", "token_url": "ftp://x", "client_id": "c", "refresh_token": "r"},
         "auth.token_url: must be an http:// or https:// URL"),
        ({"type": "oauth2_refresh_token", "token_url": "https://x/token", "client_id": "c"},
         "auth.refresh_token: Field required"),
        ({"type": "oauth2_client_credentials", "token_url": "https://x/token", "client_id": "c"},
         "auth.client_secret: Field required"),
        ({"type": "oauth2_client_credentials", "token_url": "https://x/token", "client_id": "c",
          "client_secret": "s", "client_auth": "jwt"}, "auth.client_auth"),
    ],
)
def test_a_bad_oauth2_config_names_the_key(stripe_api: StripeApi, auth: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        registry.validate("rest", stripe_config(stripe_api, auth))
    assert problem in str(caught.value)


@pytest.mark.parametrize("kind", ["rest", "graphql"])
def test_client_secret_and_refresh_token_are_secrets_to_seal(kind: str) -> None:
    auth = {"type": "oauth2_refresh_token", "token_url": "https://auth.example.com/token", "client_id": "c",
            "client_secret": "cs", "refresh_token": "rt_x"}
    if kind == "rest":
        config: dict[str, Any] = {"base_url": "https://api.example.com", "auth": auth,
                                  "resources": {"r": {"path": "/r", "primary_key": "id"}}}
    else:
        config = {"endpoint": "https://api.example.com/graphql", "auth": auth,
                  "resources": {"r": {"query": "query { r { id } }", "records": "data.r", "primary_key": "id"}}}

    paths = registry.validate(kind, config)

    assert sorted(paths) == [("auth", "client_secret"), ("auth", "refresh_token")]


def test_a_token_url_on_a_refused_address_is_refused_when_the_config_is_stored(stripe_api: StripeApi) -> None:
    auth = {"type": "oauth2_client_credentials", "token_url": "http://169.254.169.254/token", "client_id": "c",
            "client_secret": "s"}
    config = stripe_config(stripe_api, auth)
    config["base_url"] = "https://api.example.com"

    with pytest.raises(ConfigError, match=r"auth\.token_url: 169\.254\.169\.254 is a link-local address"):
        registry.validate("rest", config)
