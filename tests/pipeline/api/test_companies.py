"""POST and PATCH /companies on what once escaped a handler as a 500, and on how a PATCH tells
another connector's config (409) from a bad one of the company's own (422)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from sqlalchemy import Engine

from pipeline.companies import add_company, update_company
from pipeline.errors import ConfigError
from pipeline.settings import Settings
from storage.base import BlobStore
from tests.pipeline.api.conftest import Api, start_api

KEY = "unit-admin-key"
ADMIN = {"X-API-Key": KEY}
JSON = {**ADMIN, "Content-Type": "application/json"}
QUERY = "query($first: Int!, $after: String) { jobs(first: $first, after: $after) { nodes { id } } }"


@pytest.fixture
def admin_api(api_settings: Settings, api_engine: Engine, local_store: BlobStore) -> Iterator[Api]:
    key = SecretStr(Fernet.generate_key().decode())  # inline secrets (OAuth2's client_secret) are sealed
    settings = api_settings.model_copy(update={"admin_api_key": KEY, "secrets_key": key})
    yield from start_api(settings, api_engine, local_store)


def rest(base_url: str = "https://api.example.com", **extra: Any) -> dict[str, Any]:
    return {"base_url": base_url, "resources": {"jobs": {"path": "/jobs", "primary_key": "id"}}, **extra}


def graphql(endpoint: str = "https://api.example.com/graphql", query: str = QUERY, **extra: Any) -> dict[str, Any]:
    resource = {"query": query, "records": "data.jobs.nodes", "primary_key": "id",
                "paginator": {"type": "relay", "page_info": "data.jobs.pageInfo"}}
    return {"endpoint": endpoint, "resources": {"jobs": resource}, **extra}


def message(answer: Any) -> str:
    body = answer.json()
    assert set(body) == {"error"}, body
    return str(body["error"]["message"])


def add(api: Api, connector: str, config: dict[str, Any]) -> Any:
    return api.client.post("/companies", json={"name": "c", "connector": connector, "config": config},
                           headers=ADMIN)


@pytest.mark.parametrize(("connector", "config"), [
    ("rest", rest("https://xn--a.example")),  # httpx's URL.host would IDNA-decode the label and raise
    ("graphql", graphql("https://xn--.example/graphql")),
    ("rest", rest(auth={"type": "oauth2_client_credentials", "token_url": "https://xn--a.example/token",
                        "client_id": "c", "client_secret": "s"})),
])
def test_a_host_name_with_a_label_idna_cannot_decode_is_stored_like_any_host_name(
    admin_api: Api, connector: str, config: dict[str, Any]
) -> None:
    # Was a 500 (ST101 of the running-server contract run): the admission check decoded the host.
    answer = add(admin_api, connector, config)
    assert answer.status_code == 201, answer.text


@pytest.mark.parametrize(("body", "named"), [
    (b'{"name": "c", "connector": "synthetic", "toggles": {"\\ud800": true}}', "toggles.\\ud800"),
    (b'{"name": "c", "connector": "synthetic", "config": {"fail_partitions": ["\\udc00"]}}',
     "config.fail_partitions[0]"),
    (b'{"name": "c", "connector": "rest", "config": {"base_url": "https://a.example", "resources": {"r": '
     b'{"path": "/r", "primary_key": "id", "params": {"since": NaN}}}}}', "config.resources.r.params.since"),
    (b'{"name": "c", "connector": "rest", "config": {"base_url": "https://a.example", "resources": {"r": '
     b'{"path": "/r", "primary_key": "id", "params": {"big": 1e400}}}}}', "config.resources.r.params.big"),
    (b'{"name": "c", "connector": "graphql", "config": {"endpoint": "https://a.example", "resources": {"r": '
     b'{"query": "query($x: Int) { r { id } }", "records": "data.r", "primary_key": "id", '
     b'"variables": {"x": -Infinity}}}}}', "config.resources.r.variables.x"),
])
def test_what_postgresql_cannot_store_is_refused_with_422_naming_the_key(
    admin_api: Api, body: bytes, named: str
) -> None:
    # Lone surrogates (a JSON escape), NaN and infinities (Python's JSON parser reads them) were 500s
    # from PostgreSQL's JSONB; every string-typed field already refused them, dict keys and values did not.
    before = admin_api.client.get("/companies", headers=ADMIN).json()
    answer = admin_api.client.post("/companies", content=body, headers=JSON)
    assert answer.status_code == 422, answer.text
    assert named in message(answer)
    assert admin_api.client.get("/companies", headers=ADMIN).json() == before


def test_a_patch_with_what_postgresql_cannot_store_is_refused_with_422_naming_the_key(admin_api: Api) -> None:
    company = add(admin_api, "synthetic", {}).json()["id"]
    answer = admin_api.client.patch(f"/companies/{company}", content=b'{"toggles": {"a\\udfff": false}}', headers=JSON)
    assert answer.status_code == 422, answer.text
    assert "toggles.a\\udfff" in message(answer)


@pytest.mark.parametrize(("connector", "config", "key"), [
    ("rest", rest("http://127.0.0.1:9/"), "base_url"),
    ("graphql", graphql("http://169.254.169.254/graphql"), "endpoint"),
    ("graphql", graphql(auth={"type": "oauth2_client_credentials", "token_url": "http://10.1.2.3/token",
                              "client_id": "c", "client_secret": "s"}), "auth.token_url"),
])
def test_a_refused_ip_literal_answers_403_naming_the_key_for_every_url_of_a_config(
    admin_api: Api, connector: str, config: dict[str, Any], key: str
) -> None:
    # graphql's endpoint and every token_url answered 422: their check re-raised a plain ConfigError.
    answer = add(admin_api, connector, config)
    assert answer.status_code == 403, answer.text
    assert f"{connector} config: {key}: " in message(answer) and "PIPELINE_UPSTREAM_ALLOWLIST" in message(answer)


def test_a_patch_tells_another_connectors_config_from_a_bad_one_of_its_own_by_shape(admin_api: Api) -> None:
    graphql_company = add(admin_api, "graphql", graphql()).json()["id"]
    rest_company = add(admin_api, "rest", rest()).json()["id"]
    unparseable = graphql(query="query { jobs(")

    def patch(company: int, config: dict[str, Any]) -> Any:
        return admin_api.client.patch(f"/companies/{company}", json={"config": config}, headers=ADMIN)

    own_but_bad = patch(graphql_company, unparseable)
    assert own_but_bad.status_code == 422, own_but_bad.text
    assert "resources.jobs.query: not a valid GraphQL document" in message(own_but_bad)

    for company, config in [(graphql_company, rest()), (rest_company, unparseable), (rest_company, {})]:
        other = patch(company, config)
        assert other.status_code == 409, other.text
        assert "send a" in message(other)

    missing_key = patch(rest_company, {"resources": rest()["resources"]})
    assert missing_key.status_code == 422 and "base_url: Field required" in message(missing_key)


@pytest.mark.parametrize(("fields", "named"), [
    ({"name": "n" * 201}, "company name must be at most 200 characters"),
    ({"name": "n", "external_id": "e" * 201}, "external id must be at most 200 characters"),
])
def test_what_the_columns_cannot_hold_is_a_config_error_for_the_cli_too(
    admin_api: Api, fields: dict[str, Any], named: str
) -> None:
    # The API's schema bounds both; `pipeline company add` calls add_company directly (was a DataError).
    with pytest.raises(ConfigError, match=named):
        add_company(admin_api.engine, connector="synthetic", config={}, **fields)
    company = add_company(admin_api.engine, name="n", connector="synthetic", config={})
    with pytest.raises(ConfigError, match="company name must be at most 200"):
        update_company(admin_api.engine, company.id, name="n" * 201)
