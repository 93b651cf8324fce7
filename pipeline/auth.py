"""Bearer tokens for the read API: HS256 JWTs signed with ``PIPELINE_JWT_SECRET``.

Claims: ``sub``, ``iss`` (``PIPELINE_JWT_ISSUER``), ``exp``, ``iat``, ``company_id`` (integer),
``role`` (``admin`` | ``manager`` | ``technician``) and, for technicians, ``employee_id``.
The algorithm is fixed server-side: a token's own ``alg`` header is never trusted.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cachetools import LRUCache

from pipeline.errors import AuthError, ConfigError
from pipeline.policies import ROLES
from pipeline.settings import Settings

ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key is at least as long as the hash.
REQUIRED_CLAIMS = ("exp", "iss", "sub")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the verified claims of a token."""

    sub: str
    company_id: int
    role: str
    employee_id: str | None = None


def jwt_secret(settings: Settings) -> str:
    """Return the configured signing secret.

    Raises:
        ConfigError: ``PIPELINE_JWT_SECRET`` is unset or shorter than 32 bytes.
    """
    secret = settings.jwt_secret
    if not secret:
        raise ConfigError("PIPELINE_JWT_SECRET is not set: the read API cannot issue or verify tokens")
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"PIPELINE_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes long for HS256")
    return secret


def issue_token(
    settings: Settings,
    *,
    company_id: int,
    role: str,
    employee_id: str | int | None = None,
    ttl_s: int = 3600,
    subject: str | None = None,
) -> str:
    """Sign a token for one company and role.

    Parameters:
        settings: supplies the secret and the issuer.
        company_id: the company the bearer may read.
        role: ``admin``, ``manager`` or ``technician``.
        employee_id: required for technicians: the jobs they may see.
        ttl_s: lifetime in seconds.
        subject: the ``sub`` claim; defaults to a name derived from role and ids.

    Raises:
        ConfigError: no usable secret, or an invalid argument (named).

    Returns:
        The encoded JWT.
    """
    secret = jwt_secret(settings)
    if not isinstance(company_id, int) or isinstance(company_id, bool) or company_id <= 0:
        raise ConfigError(f"company id must be a positive integer, got {company_id!r}")
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if role == "technician" and (employee_id is None or str(employee_id) == ""):
        raise ConfigError("a technician token needs an employee id")
    if ttl_s <= 0:
        raise ConfigError(f"token TTL must be positive, got {ttl_s}")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject or f"{role}:{company_id}" + (f":{employee_id}" if employee_id is not None else ""),
        "iss": settings.jwt_issuer,
        "iat": now,
        "exp": now + int(ttl_s),
        "company_id": company_id,
        "role": role,
    }
    if employee_id is not None:
        claims["employee_id"] = employee_id
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(settings: Settings, token: str) -> Principal:
    """Verify a token and return its principal.

    Raises:
        AuthError: anything wrong with the token, with the reason (never the secret).
        ConfigError: no usable secret is configured.
    """
    secret = jwt_secret(settings)
    principal, _ = _decode(secret, settings.jwt_issuer, token)
    return principal


def _decode(secret: str, issuer: str, token: str) -> tuple[Principal, float]:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=issuer,
            options={"require": list(REQUIRED_CLAIMS)},
        )
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from exc
    company_id = claims.get("company_id")
    if not isinstance(company_id, int) or isinstance(company_id, bool) or company_id <= 0:
        raise AuthError("invalid token: claim 'company_id' must be a positive integer")
    role = claims.get("role")
    if role not in ROLES:
        raise AuthError(f"invalid token: claim 'role' must be one of {', '.join(ROLES)}")
    employee_id = claims.get("employee_id")
    if employee_id is not None and (
        isinstance(employee_id, bool) or not isinstance(employee_id, str | int) or str(employee_id) == ""
    ):
        raise AuthError("invalid token: claim 'employee_id' must be a string or an integer")
    if role == "technician" and employee_id is None:
        raise AuthError("invalid token: a technician token needs claim 'employee_id'")
    exp = claims["exp"]
    principal = Principal(
        sub=str(claims["sub"]),
        company_id=company_id,
        role=str(role),
        employee_id=None if employee_id is None else str(employee_id),
    )
    return principal, float(exp)


class TokenVerifier:
    """``verify_token`` with a bounded memo of tokens already verified, for the request path.

    A token string is the signed input itself, so a token that verified once verifies again
    until its ``exp``; only that expiry is re-checked on a hit. Failures are never remembered.
    """

    def __init__(self, settings: Settings, *, max_entries: int = 10_000) -> None:
        self._secret = jwt_secret(settings)
        self._issuer = settings.jwt_issuer
        self._verified: LRUCache[str, tuple[Principal, float]] = LRUCache(maxsize=max_entries)
        self._lock = threading.Lock()  # cachetools' caches are not thread-safe

    def __call__(self, token: str) -> Principal:
        """Return the token's principal. Raises ``AuthError``."""
        with self._lock:
            entry = self._verified.get(token)
        if entry is not None:
            principal, exp = entry
            if time.time() < exp:
                return principal
            with self._lock:
                self._verified.pop(token, None)
            raise AuthError("invalid token: Signature has expired")
        principal, exp = _decode(self._secret, self._issuer, token)
        with self._lock:
            self._verified[token] = (principal, exp)
        return principal
