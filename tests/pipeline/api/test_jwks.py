"""Tokens from an identity provider: RS256 and ES256 keys from a JWKS served on loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import jwt
import pytest
from sqlalchemy import Engine

from pipeline.errors import ConfigError
from pipeline.settings import Settings, load_settings
from storage.base import BlobStore
from tests.pipeline.api.conftest import Api, start_api
from tests.pipeline.api.helpers import PARTITION, SECRET, bearer, employee_ids, jobs_of, unsigned_token
from tests.pipeline.api.jwks import (
    CLAIMS,
    PROVIDER_AUDIENCE,
    PROVIDER_ISSUER,
    JwksServer,
    SigningKey,
    hs256_with_public_key,
    jwks_server,
    provider_claims,
)

DOCUMENT = f"/v1/schedule/{PARTITION}"
RSA_KEY = SigningKey.rsa("rsa-1")
EC_KEY = SigningKey.ec("ec-1")
ROTATED_KEY = SigningKey.rsa("rsa-2")
STRANGER_KEY = SigningKey.rsa("rsa-1")  # same kid as RSA_KEY, another key pair


def provider_settings(base: Settings, url: str, **overrides: Any) -> Settings:
    values = {
        **base.model_dump(),
        "jwks_url": url,
        "jwt_audience": PROVIDER_AUDIENCE,
        "jwt_issuer": PROVIDER_ISSUER,
        **CLAIMS,
        "jwks_refresh_min_interval_s": 0,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def idp() -> Iterator[JwksServer]:
    with jwks_server(RSA_KEY, EC_KEY) as server:
        yield server


@pytest.fixture
def make_api(
    api_settings: Settings, api_engine: Engine, local_store: BlobStore
) -> Iterator[Callable[..., Api]]:
    stack: list[Generator[Api, None, None]] = []

    def make(url: str, **overrides: Any) -> Api:
        started = start_api(provider_settings(api_settings, url, **overrides), api_engine, local_store)
        stack.append(started)
        return next(started)

    yield make
    for started in reversed(stack):
        started.close()


@pytest.fixture
def provider_api(make_api: Callable[..., Api], idp: JwksServer) -> Api:
    return make_api(idp.url)


@pytest.mark.parametrize("key", [RSA_KEY, EC_KEY], ids=["RS256", "ES256"])
def test_a_provider_token_reads_its_company_from_a_dotted_claim_path(provider_api: Api, key: SigningKey) -> None:
    own, other = provider_api.add_tenant(), provider_api.add_tenant()
    token = key.sign(provider_claims(own.id))
    response = provider_api.client.get(DOCUMENT, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json() == own.schedule
    assert provider_api.client.get("/v1/schedule", headers=bearer(token)).status_code == 200
    # The claim decides the company: the other tenant's token reads the other tenant's document.
    other_token = key.sign(provider_claims(other.id))
    assert provider_api.client.get(DOCUMENT, headers=bearer(other_token)).json() == other.schedule


def test_a_provider_technician_sees_only_their_jobs_and_a_string_company_id_is_accepted(provider_api: Api) -> None:
    tenant = provider_api.add_tenant()
    employee = employee_ids(tenant.schedule)[0]
    token = RSA_KEY.sign(provider_claims(str(tenant.id), "technician", employee_id=str(employee)))
    response = provider_api.client.get(DOCUMENT, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert [job["id"] for job in response.json()["jobs"]] == jobs_of(tenant.schedule, employee)


def test_builtin_hs256_tokens_still_work_beside_the_provider(provider_api: Api) -> None:
    tenant = provider_api.add_tenant()
    response = provider_api.client.get(DOCUMENT, headers=provider_api.headers(tenant.id, "manager"))
    assert response.status_code == 200, response.text


def test_a_key_rotated_in_mid_test_is_fetched_on_its_first_token_and_the_old_one_stops(
    provider_api: Api, idp: JwksServer
) -> None:
    tenant = provider_api.add_tenant()
    first = RSA_KEY.sign(provider_claims(tenant.id))
    assert provider_api.client.get(DOCUMENT, headers=bearer(first)).status_code == 200
    fetched = idp.fetches
    too_early = ROTATED_KEY.sign(provider_claims(tenant.id))
    response = provider_api.client.get(DOCUMENT, headers=bearer(too_early))
    assert response.status_code == 401 and "rsa-2" in response.json()["error"]["message"]

    idp.publish(ROTATED_KEY, EC_KEY)  # the provider rotates: rsa-1 out, rsa-2 in
    rotated = ROTATED_KEY.sign(provider_claims(tenant.id))
    response = provider_api.client.get(DOCUMENT, headers=bearer(rotated))
    assert response.status_code == 200, response.text
    assert idp.fetches > fetched
    retired = RSA_KEY.sign(provider_claims(tenant.id))
    assert provider_api.client.get(DOCUMENT, headers=bearer(retired)).status_code == 401
    # The ES256 key stayed in the set: its tokens never noticed.
    assert provider_api.client.get(DOCUMENT, headers=bearer(EC_KEY.sign(provider_claims(tenant.id)))).status_code == 200


def test_unknown_kids_refetch_the_key_set_at_most_once_per_interval(
    make_api: Callable[..., Api], idp: JwksServer
) -> None:
    api = make_api(idp.url, jwks_refresh_min_interval_s=3600)
    tenant = api.add_tenant()
    for number in range(5):
        made_up = SigningKey(f"made-up-{number}", "RS256", STRANGER_KEY.private)
        assert api.client.get(DOCUMENT, headers=bearer(made_up.sign(provider_claims(tenant.id)))).status_code == 401
    assert idp.fetches == 2  # the first look-up, then one refresh for the first unknown kid
    assert api.client.get(DOCUMENT, headers=bearer(RSA_KEY.sign(provider_claims(tenant.id)))).status_code == 200


def expired(company: int) -> dict[str, Any]:
    now = int(time.time())
    return provider_claims(company, iat=now - 3600, exp=now - 60)


BAD_PROVIDER_TOKENS: dict[str, Callable[[int], str]] = {
    "alg-confusion-hs256-with-public-key": lambda c: hs256_with_public_key(RSA_KEY, provider_claims(c)),
    "alg-none": lambda c: unsigned_token({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, provider_claims(c)),
    "unknown-kid": lambda c: SigningKey("nobody", "RS256", RSA_KEY.private).sign(provider_claims(c)),
    "no-kid": lambda c: unsigned_token({"alg": "RS256", "typ": "JWT"}, provider_claims(c), b"x" * 256),
    "known-kid-other-key": lambda c: STRANGER_KEY.sign(provider_claims(c)),
    "es256-header-on-an-rsa-kid": lambda c: SigningKey("rsa-1", "ES256", EC_KEY.private).sign(provider_claims(c)),
    "wrong-audience": lambda c: RSA_KEY.sign(provider_claims(c, aud="another-api")),
    "missing-audience": lambda c: RSA_KEY.sign(provider_claims(c, aud=None)),
    "wrong-issuer": lambda c: RSA_KEY.sign(provider_claims(c, iss="https://evil.example.test/")),
    "missing-issuer": lambda c: RSA_KEY.sign(provider_claims(c, iss=None)),
    "expired": lambda c: RSA_KEY.sign(expired(c)),
    "missing-exp": lambda c: RSA_KEY.sign(provider_claims(c, exp=None)),
    "missing-sub": lambda c: RSA_KEY.sign(provider_claims(c, sub=None)),
    "missing-company-claim": lambda c: RSA_KEY.sign(provider_claims(None)),
    "company-at-the-top-level-only": lambda c: RSA_KEY.sign(provider_claims(None, company_id=c)),
    "non-numeric-company": lambda c: RSA_KEY.sign(provider_claims("acme")),
    "missing-role-claim": lambda c: RSA_KEY.sign(provider_claims(c, None)),
    "provider-role-is-not-ours": lambda c: RSA_KEY.sign(provider_claims(c, "authenticated")),
    "technician-without-employee": lambda c: RSA_KEY.sign(provider_claims(c, "technician")),
    "hs512": lambda c: unsigned_token({"alg": "HS512", "kid": "rsa-1"}, provider_claims(c), b"sig"),
}


@pytest.mark.parametrize("make_token", list(BAD_PROVIDER_TOKENS.values()), ids=list(BAD_PROVIDER_TOKENS))
def test_every_bad_provider_token_is_answered_401_with_a_json_body(
    provider_api: Api, make_token: Callable[[int], str]
) -> None:
    tenant = provider_api.add_tenant()
    response = provider_api.client.get(DOCUMENT, headers=bearer(make_token(tenant.id)))
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert b'"jobs"' not in response.content


def test_an_unreachable_key_set_answers_503_not_a_verdict(make_api: Callable[..., Api]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = make_api(f"http://127.0.0.1:{port}/jwks.json")
    tenant = api.add_tenant()
    response = api.client.get(DOCUMENT, headers=bearer(RSA_KEY.sign(provider_claims(tenant.id))))
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "identity_provider_unavailable"
    assert "retry-after" in response.headers


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"jwt_issuer": PROVIDER_ISSUER}, "PIPELINE_JWT_AUDIENCE"),
        ({"jwt_audience": PROVIDER_AUDIENCE}, "PIPELINE_JWT_ISSUER"),
        ({}, "PIPELINE_JWT_AUDIENCE and PIPELINE_JWT_ISSUER"),
    ],
)
def test_a_jwks_url_without_audience_or_issuer_is_a_settings_error_naming_them(
    overrides: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(jwks_url="https://idp.example.test/jwks.json", jwt_secret=SECRET, **overrides)


def test_a_jwks_url_must_be_http_or_https() -> None:
    with pytest.raises(ConfigError, match="PIPELINE_JWKS_URL"):
        load_settings(jwks_url="file:///etc/passwd", jwt_audience="a", jwt_issuer="i")


def test_with_a_jwks_url_the_api_starts_without_a_jwt_secret(
    make_api: Callable[..., Api], idp: JwksServer
) -> None:
    api = make_api(idp.url, jwt_secret=None)
    tenant = api.add_tenant()
    assert api.client.get(DOCUMENT, headers=bearer(RSA_KEY.sign(provider_claims(tenant.id)))).status_code == 200
    builtin = jwt.encode(
        {"sub": "x", "iss": PROVIDER_ISSUER, "exp": int(time.time()) + 60, "company_id": tenant.id, "role": "manager"},
        SECRET,
        algorithm="HS256",
    )
    response = api.client.get(DOCUMENT, headers=bearer(builtin))
    assert response.status_code == 401 and "not accepted" in response.json()["error"]["message"]
