"""The database token store: one refresh per company across threads and processes, sealed tokens,
revocations remembered, re-authorization, on PostgreSQL and SQLite."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, select

from connectors.oauth2 import AccessToken, OAuth2Auth, UpstreamAuthError
from connectors.rest import RestConnector
from errors import ConfigError, UpstreamError
from pipeline import migrate
from pipeline.companies import add_company
from pipeline.db import make_engine
from pipeline.models import OAUTH_TOKENS
from pipeline.oauth_tokens import DatabaseTokenStore
from pipeline.secrets import SecretBox, rotate_stored_secrets
from tests.connectors.support import loopback_context
from tests.fakes.oauth2 import OAuth2Provider
from tests.fakes.upstreams import StripeApi

CLIENT_ID, CLIENT_SECRET = "sync-pipeline", "cs_client-secret"
KEY = Fernet.generate_key().decode()
THREADS = 8


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'pipeline.db'}"
    else:
        make_database: Callable[[], str] = request.getfixturevalue("make_database")
        url = make_database()
    migrate.upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def provider(oauth_provider: OAuth2Provider) -> OAuth2Provider:
    oauth_provider.register_client(CLIENT_ID, CLIENT_SECRET)
    return oauth_provider


def config_for(provider: OAuth2Provider, api: StripeApi, refresh_token: str) -> dict[str, Any]:
    return {
        "base_url": api.base_url,
        "auth": {"type": "oauth2_refresh_token", "token_url": provider.token_url, "client_id": CLIENT_ID,
                 "client_secret": CLIENT_SECRET, "refresh_token": refresh_token},
        "resources": {"customers": {"path": "/v1/customers", "records": "data", "primary_key": "id"}},
    }


@dataclass
class Tenant:
    """A company with an OAuth2 REST config, in ``engine``, whose tokens are sealed with ``KEY``."""

    engine: Engine
    company: int
    config: dict[str, Any]

    @contextmanager
    def workers(self, count: int, *, config: dict[str, Any] | None = None) -> Iterator[list[OAuth2Auth]]:
        """The auth of ``count`` connectors as ``count`` workers would build them, each with its
        own store; the connectors are closed afterwards."""
        connectors = [
            RestConnector(config or self.config, context=loopback_context(),
                          tokens=DatabaseTokenStore(self.engine, self.company, sealer=SecretBox(KEY)))
            for _ in range(count)
        ]
        try:
            auths: list[OAuth2Auth] = []
            for connector in connectors:
                assert isinstance(connector._auth, OAuth2Auth)
                auths.append(connector._auth)
            yield auths
        finally:
            for connector in connectors:
                connector.close()


@pytest.fixture
def make_tenant(provider: OAuth2Provider, stripe_api: StripeApi) -> Callable[..., Tenant]:
    """``make_tenant(engine, refresh_token=None)``: a new grant unless ``refresh_token`` is given."""

    def make(engine: Engine, refresh_token: str | None = None) -> Tenant:
        config = config_for(provider, stripe_api, refresh_token or provider.issue_grant(CLIENT_ID))
        company = add_company(engine, name="c", connector="rest", config=config, context=loopback_context(),
                              secrets=SecretBox(KEY)).id
        return Tenant(engine, company, config)

    return make


def all_at_once(calls: list[Callable[[], AccessToken]]) -> list[AccessToken]:
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], AccessToken]) -> AccessToken:
        barrier.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_concurrent_workers_refresh_once_and_share_the_token(
    engine: Engine, provider: OAuth2Provider, make_tenant: Callable[..., Tenant]
) -> None:
    with make_tenant(engine).workers(THREADS) as workers:
        first = all_at_once([auth.access_token for auth in workers])
        assert provider.refreshes == 1 and len({token.value for token in first}) == 1

        # Every worker gets a 401 with that token at once: one refresh, and all use its token.
        stale = first[0].value
        second = all_at_once([partial(auth._refresh, stale=stale) for auth in workers])
    assert provider.refreshes == 2 and not provider.revoked()
    assert len({token.value for token in second}) == 1 and second[0].value != stale


def test_tokens_are_sealed_at_rest_and_the_rotated_refresh_token_is_stored(
    engine: Engine, provider: OAuth2Provider, make_tenant: Callable[..., Tenant]
) -> None:
    tenant = make_tenant(engine)
    with tenant.workers(1) as [auth]:
        token = auth.access_token()
    with engine.connect() as conn:
        row = conn.execute(select(OAUTH_TOKENS)).one()
    rotated = provider.current_refresh_token()
    assert rotated is not None and rotated != tenant.config["auth"]["refresh_token"]
    stored = repr(row._mapping)
    assert rotated not in stored and token.value not in stored
    assert SecretBox(KEY).open(row.refresh_token) == rotated
    assert row.refreshes == 1


def test_a_refused_grant_is_remembered_until_the_connection_is_re_authorized(
    engine: Engine, provider: OAuth2Provider, stripe_api: StripeApi, make_tenant: Callable[..., Tenant]
) -> None:
    tenant = make_tenant(engine, "rt_never_issued")
    with tenant.workers(2) as [first_worker, second_worker]:
        with pytest.raises(UpstreamAuthError, match="must be re-authorized"):
            first_worker.access_token()
        with pytest.raises(UpstreamAuthError, match="upstream_auth"):
            second_worker.access_token()
    assert len(provider.requests) == 1, "the second worker did not present the refused token again"

    renewed = config_for(provider, stripe_api, provider.issue_grant(CLIENT_ID))
    with tenant.workers(1, config=renewed) as [auth]:
        assert auth.access_token().value.startswith("at_")


def test_without_a_secrets_key_the_store_refuses_naming_the_setting(
    engine: Engine, make_tenant: Callable[..., Tenant]
) -> None:
    tenant = make_tenant(engine)
    connector = RestConnector(tenant.config, context=loopback_context(),
                              tokens=DatabaseTokenStore(engine, tenant.company, sealer=SecretBox(None)))
    try:
        with pytest.raises(ConfigError, match="PIPELINE_SECRETS_KEY is not set"):
            connector._auth.access_token()  # type: ignore[union-attr]
    finally:
        connector.close()


def test_secrets_rotate_re_encrypts_the_stored_tokens_under_the_new_key(
    engine: Engine, provider: OAuth2Provider, make_tenant: Callable[..., Tenant]
) -> None:
    tenant = make_tenant(engine)
    with tenant.workers(1) as [auth]:
        token = auth.access_token()
    new_key = Fernet.generate_key().decode()

    secrets, _companies = rotate_stored_secrets(engine, SecretBox(f"{new_key},{KEY}"))

    assert secrets == 2 + 2, "client_secret and refresh_token in the config, two tokens in oauth_tokens"
    store = DatabaseTokenStore(engine, tenant.company, sealer=SecretBox(new_key))
    current = store.current(auth.grant)
    assert current is not None and current.value == token.value
    with engine.connect() as conn:
        row = conn.execute(select(OAUTH_TOKENS)).one()
    assert SecretBox(new_key).open(row.refresh_token) == provider.current_refresh_token()


def test_a_refresh_waits_for_another_hosts_lock_only_so_long(
    make_database: Callable[[], str], provider: OAuth2Provider, make_tenant: Callable[..., Tenant]
) -> None:
    url = make_database()
    migrate.upgrade(url)
    engine = make_engine(url)
    tenant = make_tenant(engine)
    try:
        with tenant.workers(1) as [auth]:
            auth.access_token()
        company = tenant.company
        store = DatabaseTokenStore(engine, company, sealer=SecretBox(KEY), lock_wait_s=1.0)
        with engine.connect() as other_host, other_host.begin():
            # Another host's worker is in the middle of a refresh: it holds the row.
            other_host.execute(select(OAUTH_TOKENS).where(OAUTH_TOKENS.c.company_id == company).with_for_update())
            started = time.monotonic()
            with pytest.raises(UpstreamError, match="held the lock for over 1s") as caught:
                store.refresh(auth.grant, stale=None, obtain=auth._obtain)
            waited = time.monotonic() - started
        # It gave up while the other host still held the row (no upper time bound needed: a wait
        # without end would never reach here), and not before its lock_wait_s.
        assert caught.value.retryable and waited >= 0.9
        assert provider.refreshes == 1, "the waiting worker did not refresh"
    finally:
        engine.dispose()
