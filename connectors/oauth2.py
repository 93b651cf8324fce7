"""OAuth2 for the declarative connectors: client credentials and rotating refresh tokens.

Config (``auth`` of a ``rest`` or ``graphql`` connector)::

    {"type": "oauth2_client_credentials", "token_url": "https://…/oauth/token",
     "client_id": "…", "client_secret": "…", "scope": "read"?}
    {"type": "oauth2_refresh_token", "token_url": "https://…/oauth/token",
     "client_id": "…", "client_secret": "…"?, "refresh_token": "…", "scope": "read"?}

``client_secret`` and ``refresh_token`` are secrets (pydantic ``SecretStr``, encrypted at rest
with every other tenant credential). ``client_auth`` (default ``basic``, RFC 6749 §2.3.1) sends
the client credentials as HTTP Basic; ``post`` sends them in the form body.

The access token is not kept in the config: a ``TokenStore`` (PostgreSQL in the pipeline,
``MemoryTokenStore`` here) caches it per company for every worker on every host. A token that
expires within ``REFRESH_MARGIN_S`` seconds, or that the upstream answers 401 to, is refreshed
once, through ``TokenStore.refresh``, which serializes refreshes of one grant across the fleet
and commits a rotated refresh token before the new access token is handed out. A worker that
waited for another's refresh gets the token the other obtained instead of refreshing again:
with rotating refresh tokens, a second refresh would reuse a spent refresh token, and the
provider would revoke the whole grant (OAuth 2.0 Security BCP, RFC 9700 §4.14.2).

``invalid_grant`` from the token endpoint (revoked, expired or reused refresh token) raises
``UpstreamAuthError``: the company's tasks fail with ``upstream_auth`` until someone
re-authorizes the connection, i.e. stores a new ``refresh_token`` in the config (a different
grant fingerprint starts over from it).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, StringConstraints

from connectors.urls import ENDPOINT_PATTERN, check_endpoint
from errors import UpstreamError

if TYPE_CHECKING:
    from connectors.rest.http import HttpClient

REFRESH_MARGIN_S = 60.0
# A token another worker obtained may itself expire before this worker's request lands (busy
# fleets, tokens that live for few requests); only a refusal of a token this worker obtained
# itself is final. This bounds the handed-over tokens tried for one request.
MAX_HANDED_TOKENS = 5
UPSTREAM_AUTH = "upstream_auth"

Secret = Annotated[SecretStr, Field(min_length=1, max_length=10_000)]
ClientId = Annotated[str, StringConstraints(min_length=1, max_length=500)]
Scope = Annotated[str, StringConstraints(min_length=1, max_length=2_000)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The validator's rule, stated in the schema too: the pattern is not a pydantic constraint, so that a
# refusal keeps the validator's message naming the key (``auth.token_url: must be an http:// …``).
TokenUrl = Annotated[
    str, Field(max_length=2_000, json_schema_extra={"pattern": ENDPOINT_PATTERN}), AfterValidator(check_endpoint)
]


class OAuth2ClientCredentials(_Model):
    """RFC 6749 §4.4: the connector authenticates as itself."""

    type: Literal["oauth2_client_credentials"]
    token_url: TokenUrl
    client_id: ClientId
    client_secret: Secret
    scope: Scope | None = None
    client_auth: Literal["basic", "post"] = "basic"


class OAuth2RefreshToken(_Model):
    """RFC 6749 §6: a user's grant, refreshed (and, at most providers, rotated) on every refresh."""

    type: Literal["oauth2_refresh_token"]
    token_url: TokenUrl
    client_id: ClientId
    client_secret: Secret | None = None
    refresh_token: Secret
    scope: Scope | None = None
    client_auth: Literal["basic", "post"] = "basic"


OAuth2Config = OAuth2ClientCredentials | OAuth2RefreshToken


class UpstreamAuthError(UpstreamError):
    """The upstream's authorization server refused the grant: the connection must be re-authorized."""

    code = UPSTREAM_AUTH


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A cached access token and the seconds it had left when read (``None``: no expiry given)."""

    value: str
    expires_in_s: float | None

    def fresh(self, *, elapsed_s: float = 0.0) -> bool:
        """Whether it has more than ``REFRESH_MARGIN_S`` left, ``elapsed_s`` after it was read."""
        return self.expires_in_s is None or self.expires_in_s - elapsed_s > REFRESH_MARGIN_S


@dataclass(frozen=True, slots=True)
class Grant:
    """What the token endpoint answered (RFC 6749 §5.1); ``refresh_token`` is the rotated one, if any."""

    access_token: str
    expires_in_s: float | None
    refresh_token: str | None


Obtain = Callable[[str | None], Grant]


class TokenStore(Protocol):
    """Where one company's access tokens are cached and its refreshes serialized.

    ``grant`` identifies the configured grant (``grant_fingerprint``); a stored token of another
    grant (the connection was re-authorized) is ignored and replaced.
    """

    def current(self, grant: str) -> AccessToken | None:
        """The cached access token of ``grant``, if any; no lock taken."""
        ...

    def refresh(self, grant: str, *, stale: str | None, obtain: Obtain) -> AccessToken:
        """A fresh access token, obtained by at most one caller at a time per company.

        Under the company's lock: if the cached token is not ``stale`` (the one the caller
        found expiring or got a 401 with) and is fresh, return it. Otherwise call
        ``obtain(refresh_token)`` with the latest rotated refresh token (``None``: use the
        configured one), store its answer — the rotated refresh token encrypted — and commit
        before returning the new access token.

        Raises:
            UpstreamAuthError: ``obtain`` raised it now, or did earlier for this grant (recorded,
                so that the company's other tasks fail without asking the token endpoint).
            UpstreamError: ``obtain`` failed otherwise (nothing stored).
        """
        ...


def grant_fingerprint(config: OAuth2Config) -> str:
    """A stable id of the configured grant; changes when the connection is re-authorized."""
    secret = config.refresh_token if isinstance(config, OAuth2RefreshToken) else config.client_secret
    material = "\x00".join([config.type, config.token_url, config.client_id, secret.get_secret_value()])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


class MemoryTokenStore:
    """``TokenStore`` in this process only: for tests and for connectors built without a store."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[AccessToken | None, float, str | None, str | None]] = {}

    def current(self, grant: str) -> AccessToken | None:
        with self._lock:
            row = self._rows.get(grant)
        if row is None or row[3] is not None:
            return None
        token, stored_at, _refresh, _revoked = row
        return None if token is None else _aged(token, time.monotonic() - stored_at)

    def refresh(self, grant: str, *, stale: str | None, obtain: Obtain) -> AccessToken:
        with self._lock:
            token, stored_at, refresh_token, revoked = self._rows.get(grant, (None, 0.0, None, None))
            if revoked is not None:
                raise UpstreamAuthError(revoked)
            if token is not None:
                aged = _aged(token, time.monotonic() - stored_at)
                if aged.value != stale and aged.fresh():
                    return aged
            try:
                answer = obtain(refresh_token)
            except UpstreamAuthError as exc:
                self._rows[grant] = (None, 0.0, refresh_token, str(exc))
                raise
            new = AccessToken(answer.access_token, answer.expires_in_s)
            self._rows[grant] = (new, time.monotonic(), answer.refresh_token or refresh_token, None)
            return new


def _aged(token: AccessToken, elapsed_s: float) -> AccessToken:
    if token.expires_in_s is None:
        return token
    return AccessToken(token.value, token.expires_in_s - elapsed_s)


class OAuth2Auth(httpx.Auth):
    """Bearer access tokens from a ``TokenStore``; one refresh on expiry or on a 401.

    A request refused with 401 is sent again with the token ``TokenStore.refresh`` hands out;
    if that token came from another worker and is refused too, again (``MAX_HANDED_TOKENS``);
    once a token this worker obtained itself is refused, the 401 is the answer.

    Parameters:
        config: the validated ``auth`` config.
        tokens: the company's token store.
        token_client: sends token requests; built without auth, so they carry the client
            credentials only. A refresh-token request is never retried once sent: a rotating
            refresh token must not be spent twice.
    """

    def __init__(self, config: OAuth2Config, *, tokens: TokenStore, token_client: HttpClient) -> None:
        self.config = config
        self.grant = grant_fingerprint(config)
        self._tokens = tokens
        self._token_client = token_client
        self._token: AccessToken | None = None
        self._read_at = 0.0
        self.refreshes = 0

    def __repr__(self) -> str:
        return f"OAuth2Auth(type={self.config.type!r}, token_url={self.config.token_url!r})"

    def _remember(self, token: AccessToken) -> AccessToken:
        self._token, self._read_at = token, time.monotonic()
        return token

    def access_token(self) -> AccessToken:
        """A token with more than ``REFRESH_MARGIN_S`` left: held, cached, or refreshed now."""
        if self._token is not None and self._token.fresh(elapsed_s=time.monotonic() - self._read_at):
            return self._token
        cached = self._tokens.current(self.grant)
        if cached is not None and cached.fresh():
            return self._remember(cached)
        return self._refresh(stale=cached.value if cached is not None else None)

    def _refresh(self, *, stale: str | None) -> AccessToken:
        self._token = None
        return self._remember(self._tokens.refresh(self.grant, stale=stale, obtain=self._obtain))

    def secret(self) -> str:
        """The ``Authorization`` header value now (obtains a token first if needed)."""
        return f"Bearer {self.access_token().value}"

    def scrub(self, text: str) -> str:
        """``text`` without the client secret, the configured refresh token or the access token held."""
        config = self.config
        secrets = [config.client_secret.get_secret_value() if config.client_secret else ""]
        if isinstance(config, OAuth2RefreshToken):
            secrets.append(config.refresh_token.get_secret_value())
        if self._token is not None:
            secrets.append(self._token.value)
        for secret in secrets:
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.access_token()
        request.headers["Authorization"] = f"Bearer {token.value}"
        response = yield request
        for _ in range(MAX_HANDED_TOKENS):
            if response.status_code != 401:
                return
            # Expired or revoked early: refresh once, or take the token another worker just got.
            refreshed_before = self.refreshes
            token = self._refresh(stale=token.value)
            request.headers["Authorization"] = f"Bearer {token.value}"
            response = yield request
            if self.refreshes > refreshed_before:
                return  # a token this worker just obtained was refused too: the 401 stands

    def _obtain(self, refresh_token: str | None) -> Grant:
        """Ask the token endpoint (RFC 6749 §4.4.2 / §6) for a new access token."""
        self.refreshes += 1
        config = self.config
        form: dict[str, str] = {}
        if isinstance(config, OAuth2RefreshToken):
            form["grant_type"] = "refresh_token"
            form["refresh_token"] = refresh_token or config.refresh_token.get_secret_value()
            secret = config.client_secret.get_secret_value() if config.client_secret else None
        else:
            form["grant_type"] = "client_credentials"
            secret = config.client_secret.get_secret_value()
        if config.scope:
            form["scope"] = config.scope
        auth: httpx.Auth | None = None
        if config.client_auth == "basic" and secret is not None:
            auth = httpx.BasicAuth(config.client_id, secret)
        else:
            form["client_id"] = config.client_id
            if secret is not None:
                form["client_secret"] = secret
        response = self._token_client.request(
            "POST", config.token_url, data=form, auth=auth, ok_statuses=_TOKEN_ERRORS,
            # A refresh token may rotate as soon as the provider reads it: never send it twice.
            idempotent=not isinstance(config, OAuth2RefreshToken),
        )
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if response.status_code in _TOKEN_ERRORS:
            raise self._token_error(response.status_code, body)
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str) or not body["access_token"]:
            raise UpstreamError(f"POST {httpx.URL(config.token_url).path}: the token response has no access_token")
        expires_in = body.get("expires_in")
        rotated = body.get("refresh_token")
        return Grant(
            access_token=body["access_token"],
            expires_in_s=float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else None,
            refresh_token=rotated if isinstance(rotated, str) and rotated else None,
        )

    def _token_error(self, status: int, body: Any) -> UpstreamError:
        error = body.get("error") if isinstance(body, dict) else None
        description = body.get("error_description") if isinstance(body, dict) else None
        detail = f"{error}: {description}" if description else str(error or f"HTTP {status}")
        detail = detail[:300]
        if error == "invalid_grant":
            return UpstreamAuthError(
                f"{UPSTREAM_AUTH}: the OAuth2 grant was refused by {self.config.token_url} ({detail}); "
                "the connection must be re-authorized: store a new refresh_token in the company's connector config",
                retryable=False,
                status=status,
            )
        return UpstreamError(f"POST {httpx.URL(self.config.token_url).path}: token request refused ({detail})",
                             retryable=False, status=status)


# RFC 6749 §5.2: errors come as 400 (401 for invalid_client) with a JSON body to read.
_TOKEN_ERRORS = frozenset({400, 401})
