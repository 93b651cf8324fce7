"""A fake OAuth2 authorization server (RFC 6749) that rotates refresh tokens, as providers do.

``POST /oauth/token`` (``application/x-www-form-urlencoded``; client authentication by HTTP Basic
or ``client_id``/``client_secret`` in the body, §2.3.1):

- ``grant_type=refresh_token`` (§6): the current refresh token of a grant gets a new access
  token *and a new refresh token*; the old one is spent. Presenting a spent refresh token again
  revokes the whole grant — every access token and refresh token of it — and answers
  ``invalid_grant``, the reuse detection of the OAuth 2.0 Security BCP (RFC 9700 §4.14.2).
- ``grant_type=client_credentials`` (§4.4): an access token, no refresh token.
- Errors (§5.2): 400 ``invalid_grant`` / ``unsupported_grant_type`` / ``invalid_request``, 401
  ``invalid_client``.

Access tokens are short-lived: each serves ``uses_per_token`` requests of a resource server
that calls ``authorize`` (``FakeUpstream.require_oauth``), then answers 401 ``invalid_token``.
``expires_in`` in the token response is ``expires_in_s``. Counters: ``refreshes`` (access
tokens issued), ``expiries`` (distinct access tokens rejected as expired), ``revocations``.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from tests.fakes.upstreams import FakeUpstream, MalformedVariant, Reply


@dataclass
class _Grant:
    client_id: str
    refresh_token: str | None
    spent: set[str] = field(default_factory=set)
    revoked: bool = False


@dataclass
class _AccessToken:
    grant: int
    uses: int = 0
    expired: bool = False


class OAuth2Provider(FakeUpstream):
    """The authorization server; ``issue_grant`` stands for a user's consent (code exchange)."""

    methods: ClassVar[frozenset[str]] = frozenset({"POST"})

    def __init__(self, *, uses_per_token: int = 25, expires_in_s: int = 3600) -> None:
        super().__init__(0)
        self.uses_per_token = uses_per_token
        self.expires_in_s = expires_in_s
        self.clients: dict[str, str] = {}
        self._grants: list[_Grant] = []
        self._tokens: dict[str, _AccessToken] = {}
        self.refreshes = 0
        self.expiries = 0
        self.revocations = 0

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/oauth/token"

    def register_client(self, client_id: str, client_secret: str) -> None:
        with self._lock:
            self.clients[client_id] = client_secret

    def issue_grant(self, client_id: str) -> str:
        """A user authorized ``client_id``: return the grant's first refresh token."""
        with self._lock:
            token = f"rt_{secrets.token_urlsafe(16)}"
            self._grants.append(_Grant(client_id, token))
            return token

    def current_refresh_token(self, grant: int = 0) -> str | None:
        """The refresh token the provider accepts now for the ``grant``-th grant issued."""
        with self._lock:
            return self._grants[grant].refresh_token

    def revoked(self) -> bool:
        with self._lock:
            return any(grant.revoked for grant in self._grants)

    def expire_all(self) -> None:
        """Expire every access token issued so far (e.g. the provider restarted)."""
        with self._lock:
            for token in self._tokens.values():
                token.uses = self.uses_per_token

    def authorize(self, headers: dict[str, str]) -> bool:
        sent = {name.lower(): value for name, value in headers.items()}.get("authorization", "")
        if not sent.startswith("Bearer "):
            return False
        with self._lock:
            token = self._tokens.get(sent.removeprefix("Bearer "))
            if token is None or self._grants_revoked(token):
                return False
            if token.uses >= self.uses_per_token:
                if not token.expired:
                    token.expired = True
                    self.expiries += 1
                return False
            token.uses += 1
            return True

    def _grants_revoked(self, token: _AccessToken) -> bool:
        return token.grant >= 0 and self._grants[token.grant].revoked

    def _error(self, status: int, error: str, description: str) -> Reply:
        return Reply(status, {"error": error, "error_description": description},
                     {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _client(self, form: dict[str, str], headers: dict[str, str]) -> str | None:
        sent = {name.lower(): value for name, value in headers.items()}.get("authorization", "")
        if sent.startswith("Basic "):
            client_id, _, secret = base64.b64decode(sent.removeprefix("Basic ")).decode().partition(":")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        known = self.clients.get(client_id)
        if known is None or (known and known != secret):
            return None
        return client_id

    def _issue(self, grant: int, *, rotate: bool) -> dict[str, Any]:
        access = f"at_{secrets.token_urlsafe(16)}"
        self._tokens[access] = _AccessToken(grant)
        self.refreshes += 1
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": self.expires_in_s}
        if rotate:
            record = self._grants[grant]
            if record.refresh_token is not None:
                record.spent.add(record.refresh_token)
            record.refresh_token = f"rt_{secrets.token_urlsafe(16)}"
            body["refresh_token"] = record.refresh_token
        return body

    def handle(self, method: str, path: str, params: dict[str, str], body: bytes, headers: dict[str, str]) -> Reply:
        if path != "/oauth/token":
            return self._error(404, "not_found", path)
        form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        with self._lock:
            client_id = self._client(form, headers)
            if client_id is None:
                return self._error(401, "invalid_client", "Client authentication failed")
            kind = form.get("grant_type")
            if kind == "client_credentials":
                return Reply(200, self._issue(-1, rotate=False), {"Cache-Control": "no-store"})
            if kind != "refresh_token":
                return self._error(400, "unsupported_grant_type", f"grant_type {kind!r} is not supported")
            presented = form.get("refresh_token")
            if not presented:
                return self._error(400, "invalid_request", "refresh_token is required")
            for index, grant in enumerate(self._grants):
                if grant.client_id != client_id:
                    continue
                if presented in grant.spent:
                    if not grant.revoked:
                        grant.revoked = True
                        self.revocations += 1
                    return self._error(400, "invalid_grant", "Refresh token reuse detected; the grant is revoked")
                if presented == grant.refresh_token:
                    if grant.revoked:
                        return self._error(400, "invalid_grant", "The grant was revoked")
                    return Reply(200, self._issue(index, rotate=True), {"Cache-Control": "no-store"})
            return self._error(400, "invalid_grant", "Unknown refresh token")

    def _error_body(self, status: int, message: str) -> Any:
        return {"error": "server_error" if status >= 500 else "invalid_request", "error_description": message}

    def _malformed_body(self, variant: MalformedVariant) -> Any:
        return {"token_type": "Bearer"}
