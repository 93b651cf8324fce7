"""Bearer tokens for the read API, from two issuers.

**Built-in** (``pipeline token``): HS256 JWTs signed with ``PIPELINE_JWT_SECRET``. Claims:
``sub``, ``iss`` (``PIPELINE_JWT_ISSUER``), ``exp``, ``iat``, ``company_id`` (integer), ``role``
(``admin`` | ``manager`` | ``technician``) and, for technicians, ``employee_id``.

**An identity provider** (Supabase Auth, Auth0, Keycloak, …) when ``PIPELINE_JWKS_URL`` is set:
RS256 or ES256 JWTs whose ``kid`` names a key of the provider's JWKS. They must carry ``exp``,
``sub``, ``iss`` equal to ``PIPELINE_JWT_ISSUER`` and ``aud`` containing ``PIPELINE_JWT_AUDIENCE``.
The company, role and employee are read at ``PIPELINE_JWT_CLAIM_COMPANY`` / ``_ROLE`` /
``_EMPLOYEE`` (dotted paths such as ``app_metadata.company_id``); the company may be an integer
or its decimal string, as providers often store custom claims as strings.

The keys are fetched with PyJWT's ``PyJWKClient`` and cached (``PIPELINE_JWKS_CACHE_S``); a
``kid`` not in the cached set refetches it, so a provider can rotate keys, but at most once per
``PIPELINE_JWKS_REFRESH_MIN_INTERVAL_S``, so tokens with made-up ``kid`` values cannot make the
API hammer the provider.

Which verification applies is decided by the token's ``alg`` header, and each path pins its own
key and algorithm: HS256 is checked only against ``PIPELINE_JWT_SECRET``, RS256/ES256 only
against the provider key named by ``kid``, whose own algorithm must be the token's. So an HS256
token "signed" with the provider's public key (algorithm confusion), ``none`` or any other
algorithm is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cachetools import LRUCache
from jwt import PyJWK, PyJWKClient, PyJWKClientConnectionError, PyJWKClientError

from pipeline.errors import AuthError, ConfigError, IdentityProviderUnavailable
from pipeline.policies import ROLES
from pipeline.settings import Settings

ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key is at least as long as the hash.
REQUIRED_CLAIMS = ("exp", "iss", "sub")
PROVIDER_ALGORITHMS = ("RS256", "ES256")
PROVIDER_REQUIRED_CLAIMS = ("exp", "iss", "sub", "aud")
PROVIDER_LEEWAY_S = 10  # clock skew between the provider's hosts and ours
JWKS_TIMEOUT_S = 5


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
    """Verify a token (built-in or, when configured, from the identity provider) and return its principal.

    Raises:
        AuthError: anything wrong with the token, with the reason (never the secret).
        ConfigError: no usable secret and no identity provider is configured.
        IdentityProviderUnavailable: the provider's key set could not be fetched.
    """
    return TokenVerifier(settings)(token)


def check_token_settings(settings: Settings) -> None:
    """Raise ``ConfigError`` unless the API can verify some token (a usable secret, or a JWKS URL)."""
    _builtin_secret(settings)


@dataclass(frozen=True, slots=True)
class ClaimNames:
    """Where a provider's token carries the company, the role and the employee (dotted paths)."""

    company: str = "company_id"
    role: str = "role"
    employee: str = "employee_id"

    @classmethod
    def of(cls, settings: Settings) -> ClaimNames:
        return cls(settings.jwt_claim_company, settings.jwt_claim_role, settings.jwt_claim_employee)


BUILTIN_CLAIMS = ClaimNames()


def _builtin_secret(settings: Settings) -> str | None:
    """The HS256 secret, or ``None`` when only the identity provider's tokens are accepted."""
    if settings.jwks_url and not settings.jwt_secret:
        return None
    return jwt_secret(settings)


def claim(claims: Mapping[str, Any], path: str) -> Any:
    """The value at dotted ``path`` in ``claims`` (``app_metadata.company_id``), or ``None``."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _principal(claims: Mapping[str, Any], names: ClaimNames, *, string_company: bool) -> Principal:
    company_id = claim(claims, names.company)
    if string_company and isinstance(company_id, str) and company_id.isascii() and company_id.isdigit():
        company_id = int(company_id) if len(company_id) <= 19 else 0
    if not isinstance(company_id, int) or isinstance(company_id, bool) or not 0 < company_id < 2**63:
        raise AuthError(f"invalid token: claim {names.company!r} must be a positive integer")
    role = claim(claims, names.role)
    if role not in ROLES:
        raise AuthError(f"invalid token: claim {names.role!r} must be one of {', '.join(ROLES)}")
    employee_id = claim(claims, names.employee)
    if employee_id is not None and (
        isinstance(employee_id, bool) or not isinstance(employee_id, str | int) or str(employee_id) == ""
    ):
        raise AuthError(f"invalid token: claim {names.employee!r} must be a string or an integer")
    if role == "technician" and employee_id is None:
        raise AuthError(f"invalid token: a technician token needs claim {names.employee!r}")
    return Principal(
        sub=str(claims["sub"]),
        company_id=company_id,
        role=str(role),
        employee_id=None if employee_id is None else str(employee_id),
    )


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
    return _principal(claims, BUILTIN_CLAIMS, string_company=False), float(claims["exp"])


class ProviderKeys:
    """The identity provider's signing keys by ``kid``, fetched from its JWKS and cached.

    Parameters:
        url: the JWKS document (``PIPELINE_JWKS_URL``).
        cache_s: how long a fetched key set is used before it is fetched again.
        refresh_min_interval_s: the shortest time between two fetches forced by an unknown ``kid``.
        timeout_s: the HTTP timeout of one fetch.
    """

    def __init__(self, url: str, *, cache_s: float, refresh_min_interval_s: float, timeout_s: float = JWKS_TIMEOUT_S):
        self._client = PyJWKClient(
            url,
            cache_jwk_set=True,
            lifespan=max(int(cache_s), 1),
            timeout=int(max(timeout_s, 1)),
            headers={"User-Agent": "sync-pipeline"},
        )
        self._refresh_min_interval_s = refresh_min_interval_s
        self._last_refresh = -float("inf")
        self._lock = threading.Lock()

    def key(self, kid: str) -> PyJWK:
        """The key named ``kid``, refetching the set once if it is not there (rate-limited).

        Raises:
            AuthError: no such key, even after a refresh.
            IdentityProviderUnavailable: the key set could not be fetched.
        """
        with self._lock:
            found = self._find(kid, refresh=False)
            now = time.monotonic()
            if found is None and now - self._last_refresh >= self._refresh_min_interval_s:
                self._last_refresh = now
                found = self._find(kid, refresh=True)
        if found is None:
            raise AuthError(f"invalid token: no key {kid!r} in the identity provider's key set")
        return found

    def _find(self, kid: str, *, refresh: bool) -> PyJWK | None:
        try:
            keys = self._client.get_signing_keys(refresh=refresh)
        except PyJWKClientConnectionError as exc:
            raise IdentityProviderUnavailable(f"the identity provider's key set could not be fetched: {exc}") from None
        except PyJWKClientError:
            return None  # a set without signing keys: every kid is unknown
        return next((key for key in keys if key.key_id == kid), None)


class _Provider:
    """Verifies the identity provider's tokens."""

    def __init__(self, settings: Settings) -> None:
        assert settings.jwks_url and settings.jwt_audience
        self.keys = ProviderKeys(
            settings.jwks_url,
            cache_s=settings.jwks_cache_s,
            refresh_min_interval_s=settings.jwks_refresh_min_interval_s,
        )
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self.names = ClaimNames.of(settings)

    def decode(self, token: str, header: Mapping[str, Any]) -> tuple[Principal, float]:
        algorithm = header.get("alg")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("invalid token: an identity provider's token needs a 'kid' header")
        key = self.keys.key(kid)
        if key.algorithm_name != algorithm:
            raise AuthError(f"invalid token: key {kid!r} is for {key.algorithm_name}, the token says {algorithm}")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                audience=self.audience,
                issuer=self.issuer,
                leeway=PROVIDER_LEEWAY_S,
                options={"require": list(PROVIDER_REQUIRED_CLAIMS)},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        return _principal(claims, self.names, string_company=True), float(claims["exp"])


def unverified_algorithm(token: str) -> tuple[str, dict[str, Any]]:
    """The ``alg`` a token claims, with its header (nothing verified yet: only to pick the verifier).

    Raises:
        AuthError: not a JWT.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from exc
    algorithm = header.get("alg")
    return (algorithm if isinstance(algorithm, str) else ""), header


class TokenVerifier:
    """Token verification with a bounded memo of tokens already verified, for the request path.

    A token string is the signed input itself, so a token that verified once verifies again
    until its ``exp``; only that expiry is re-checked on a hit. Failures are never remembered.
    (A provider key withdrawn from its JWKS therefore stops tokens already seen only at their
    ``exp``: providers keep a rotated-out key published for at least a token lifetime.)

    Raises (from the constructor):
        ConfigError: no usable ``PIPELINE_JWT_SECRET`` and no ``PIPELINE_JWKS_URL``.
    """

    def __init__(
        self, settings: Settings, *, max_entries: int = 10_000, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock  # epoch seconds for a memo hit's ``exp`` check; injectable for tests
        self._secret = _builtin_secret(settings)
        self._issuer = settings.jwt_issuer
        self._provider = _Provider(settings) if settings.jwks_url else None
        self._verified: LRUCache[str, tuple[Principal, float]] = LRUCache(maxsize=max_entries)
        self._lock = threading.Lock()  # cachetools' caches are not thread-safe

    def __call__(self, token: str) -> Principal:
        """Return the token's principal. Raises ``AuthError``."""
        with self._lock:
            entry = self._verified.get(token)
        if entry is not None:
            principal, exp = entry
            if self._clock() < exp:
                return principal
            with self._lock:
                self._verified.pop(token, None)
            raise AuthError("invalid token: Signature has expired")
        principal, exp = self._decode(token)
        with self._lock:
            self._verified[token] = (principal, exp)
        return principal

    def may_block(self, token: str) -> bool:
        """Whether verifying ``token`` may wait on the network (a provider token not yet memoised)."""
        if self._provider is None:
            return False
        with self._lock:
            if token in self._verified:
                return False
        try:
            algorithm, _ = unverified_algorithm(token)
        except AuthError:
            return False
        return algorithm in PROVIDER_ALGORITHMS

    def _decode(self, token: str) -> tuple[Principal, float]:
        algorithm, header = unverified_algorithm(token)
        if algorithm == ALGORITHM and self._secret is not None:
            return _decode(self._secret, self._issuer, token)
        if algorithm in PROVIDER_ALGORITHMS and self._provider is not None:
            return self._provider.decode(token, header)
        accepted = ([ALGORITHM] if self._secret is not None else []) + (
            list(PROVIDER_ALGORITHMS) if self._provider is not None else []
        )
        raise AuthError(f"invalid token: algorithm {algorithm or None!r} is not accepted (only {', '.join(accepted)})")
