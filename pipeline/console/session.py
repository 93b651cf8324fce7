"""Console sessions: a signed, HttpOnly, SameSite=Strict cookie and a CSRF token per session.

The cookie is a JWT (HS256) signed with a key derived from ``PIPELINE_JWT_SECRET`` for this
purpose only (a read-API token is never a valid session, nor the reverse), with its own
audience. It never holds the admin key: an operator's session holds a fingerprint of it, so
changing ``PIPELINE_ADMIN_API_KEY`` ends every operator session. A tenant's session holds the
principal of the JWT they logged in with and expires with it. Each session carries a random
CSRF token that every state-changing request must send back (form field ``csrf`` or header
``X-CSRF-Token``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt

from pipeline.auth import ALGORITHM, Principal, jwt_secret
from pipeline.settings import Settings

COOKIE = "pipeline_console"
LOGIN_CSRF_COOKIE = "pipeline_console_login"
AUDIENCE = "pipeline-console"
SESSION_TTL_S = 8 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    """Who is using the console: an operator (``admin``) or one company's manager (``tenant``)."""

    kind: str
    csrf: str
    expires_at: float
    company_id: int | None = None
    role: str = "admin"
    sub: str = "operator"

    @property
    def operator(self) -> bool:
        return self.kind == "admin"

    def principal(self) -> Principal:
        assert self.company_id is not None
        return Principal(sub=self.sub, company_id=self.company_id, role=self.role)


def _key(settings: Settings) -> bytes:
    return hmac.new(jwt_secret(settings).encode(), b"pipeline-console-session-v1", hashlib.sha256).digest()


def _fingerprint(settings: Settings) -> str:
    key = (settings.admin_api_key or "").encode()
    return hmac.new(_key(settings), key, hashlib.sha256).hexdigest()[:32]


def operator_session(settings: Settings) -> tuple[Session, str]:
    """A new operator session and its cookie value."""
    session = Session(kind="admin", csrf=secrets.token_urlsafe(24), expires_at=time.time() + SESSION_TTL_S)
    return session, _encode(settings, session, {"akf": _fingerprint(settings)})


def tenant_session(settings: Settings, principal: Principal, token_expires_at: float) -> tuple[Session, str]:
    """A new session for a company's manager, ending no later than their token."""
    session = Session(
        kind="tenant", csrf=secrets.token_urlsafe(24), expires_at=min(time.time() + SESSION_TTL_S, token_expires_at),
        company_id=principal.company_id, role=principal.role, sub=principal.sub,
    )
    return session, _encode(settings, session, {})


def _encode(settings: Settings, session: Session, extra: dict[str, Any]) -> str:
    claims = {
        "aud": AUDIENCE, "iss": settings.jwt_issuer, "sub": session.sub, "exp": int(session.expires_at),
        "kind": session.kind, "csrf": session.csrf, "company_id": session.company_id, "role": session.role, **extra,
    }
    return jwt.encode(claims, _key(settings), algorithm=ALGORITHM)


def read_session(settings: Settings, cookie: str | None) -> Session | None:
    """The session in ``cookie``, or ``None`` when it is missing, forged, expired or revoked."""
    if not cookie:
        return None
    try:
        claims = jwt.decode(cookie, _key(settings), algorithms=[ALGORITHM], audience=AUDIENCE,
                            issuer=settings.jwt_issuer, options={"require": ["exp", "aud", "iss", "sub"]})
    except jwt.PyJWTError:
        return None
    kind = claims.get("kind")
    if kind == "admin":
        if not settings.admin_api_key or not hmac.compare_digest(str(claims.get("akf", "")), _fingerprint(settings)):
            return None
        company_id = None
    elif kind == "tenant":
        company_id = claims.get("company_id")
        if not isinstance(company_id, int) or claims.get("role") not in ("admin", "manager"):
            return None
    else:
        return None
    return Session(kind=str(kind), csrf=str(claims["csrf"]), expires_at=float(claims["exp"]), company_id=company_id,
                   role=str(claims.get("role") or "admin"), sub=str(claims["sub"]))


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())
