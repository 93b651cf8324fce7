"""Bearer tokens: issuing, verifying, and every bad token answered 401 by the API."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest

from pipeline.api import create_app
from pipeline.auth import Principal, TokenVerifier, issue_token, verify_token
from pipeline.errors import AuthError, ConfigError
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from tests.pipeline.api.conftest import Api
from tests.pipeline.api.helpers import ISSUER, PARTITION, SECRET, b64url, unsigned_token

DOCUMENT = f"/v1/schedule/{PARTITION}"


def claims(company: int, /, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "tester",
        "iss": ISSUER,
        "iat": now,
        "exp": now + 600,
        "company_id": company,
        "role": "manager",
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def signed(payload: dict[str, Any], *, key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, key, algorithm=algorithm)


def tampered_company(company_id: int, other: int) -> str:
    """A genuine token whose payload was edited to name another company, signature kept."""
    header, payload, signature = signed(claims(company_id)).split(".")
    edited = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    edited["company_id"] = other
    return ".".join([header, b64url(orjson.dumps(edited)), signature])


BAD_TOKENS: dict[str, Callable[[int, int], str]] = {
    "alg-none": lambda c, _: unsigned_token({"alg": "none", "typ": "JWT"}, claims(c)),
    "alg-none-signed-looking": lambda c, _: unsigned_token({"alg": "none"}, claims(c), b"sig"),
    "hs512": lambda c, _: signed(claims(c), algorithm="HS512"),
    "hs384": lambda c, _: signed(claims(c), algorithm="HS384"),
    "wrong-secret": lambda c, _: signed(claims(c), key="another-secret-of-the-right-length-000"),
    "expired": lambda c, _: signed(claims(c, exp=int(time.time()) - 5)),
    "missing-exp": lambda c, _: signed(claims(c, exp=None)),
    "missing-iss": lambda c, _: signed(claims(c, iss=None)),
    "wrong-iss": lambda c, _: signed(claims(c, iss="someone-else")),
    "missing-sub": lambda c, _: signed(claims(c, sub=None)),
    "missing-company-id": lambda c, _: signed(claims(c, company_id=None)),
    "string-company-id": lambda c, _: signed(claims(c, company_id=str(c))),
    "boolean-company-id": lambda c, _: signed(claims(c, company_id=True)),
    "missing-role": lambda c, _: signed(claims(c, role=None)),
    "unknown-role": lambda c, _: signed(claims(c, role="superuser")),
    "technician-without-employee-id": lambda c, _: signed(claims(c, role="technician")),
    "not-yet-valid": lambda c, _: signed(claims(c, nbf=int(time.time()) + 600)),
    "tampered-company-id": lambda c, other: tampered_company(c, other),
    "garbage": lambda c, _: "not-a-jwt",
    "three-garbage-parts": lambda c, _: "a.b.c",
    "empty-payload": lambda c, _: signed({}),
}


@pytest.mark.parametrize("make_token", list(BAD_TOKENS.values()), ids=list(BAD_TOKENS))
@pytest.mark.parametrize("path", [DOCUMENT, "/v1/schedule"])
def test_every_bad_token_is_answered_401_with_a_json_error(
    api: Api, make_token: Callable[[int, int], str], path: str
) -> None:
    own, other = api.add_tenant(), api.add_tenant()
    response = api.client.get(path, headers={"Authorization": f"Bearer {make_token(own.id, other.id)}"})
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert b'"jobs"' not in response.content


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}, {"Authorization": "Token abc"}],
    ids=["missing-header", "basic-scheme", "bearer-without-token", "other-scheme"],
)
def test_a_missing_header_or_another_scheme_is_answered_401(api: Api, headers: dict[str, str]) -> None:
    api.add_tenant()
    response = api.client.get(DOCUMENT, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_valid_token_reaches_the_document(api: Api) -> None:
    tenant = api.add_tenant()
    response = api.client.get(DOCUMENT, headers={"Authorization": f"Bearer {signed(claims(tenant.id))}"})
    assert response.status_code == 200


def settings(secret: str | None = SECRET) -> Settings:
    return Settings(jwt_secret=secret, jwt_issuer=ISSUER)


def test_issued_tokens_verify_to_their_principal() -> None:
    token = issue_token(settings(), company_id=7, role="technician", employee_id=1001, ttl_s=60)
    assert verify_token(settings(), token) == Principal(
        sub="technician:7:1001", company_id=7, role="technician", employee_id="1001"
    )
    decoded = jwt.decode(token, SECRET, algorithms=["HS256"], issuer=ISSUER)
    assert decoded["exp"] - decoded["iat"] == 60 and decoded["employee_id"] == 1001
    manager = issue_token(settings(), company_id=7, role="manager", subject="alice")
    assert verify_token(settings(), manager) == Principal(sub="alice", company_id=7, role="manager")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "root"}, "role must be one of"),
        ({"role": "technician"}, "employee id"),
        ({"company_id": 0}, "positive integer"),
        ({"ttl_s": 0}, "TTL"),
    ],
)
def test_issue_token_rejects_bad_arguments_naming_them(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"company_id": 1, "role": "manager", **kwargs}
    with pytest.raises(ConfigError, match=message):
        issue_token(settings(), **arguments)


@pytest.mark.parametrize("secret", [None, "", "too-short"])
def test_no_usable_secret_is_a_config_error_for_tokens_and_the_app(
    secret: str | None, tmp_path: Path, api: Api
) -> None:
    with pytest.raises(ConfigError, match="PIPELINE_JWT_SECRET"):
        issue_token(settings(secret), company_id=1, role="manager")
    with pytest.raises(ConfigError, match="PIPELINE_JWT_SECRET"):
        verify_token(settings(secret), "x.y.z")
    runtime = Runtime(settings=settings(secret), engine=api.engine, store=api.store)
    with pytest.raises(ConfigError, match="PIPELINE_JWT_SECRET"):
        create_app(runtime)


def test_the_verifier_remembers_good_tokens_only_until_they_expire() -> None:
    # The memo's expiry check reads an injected clock, so the test moves time instead of waiting
    # for it (and a loaded machine cannot let the token expire before the first check).
    now = float(int(time.time()))
    clock = [now]
    verifier = TokenVerifier(settings(), clock=lambda: clock[0])
    token = signed(claims(3, exp=int(now) + 600))
    assert verifier(token).company_id == 3
    clock[0] = now + 599
    assert verifier(token).company_id == 3  # remembered, still valid
    with pytest.raises(AuthError):
        verifier(signed(claims(3, exp=int(now) - 1)))
    clock[0] = now + 600
    with pytest.raises(AuthError, match="expired"):
        verifier(token)
