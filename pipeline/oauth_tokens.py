"""OAuth2 tokens in the database: ``connectors.oauth2.TokenStore`` for every worker on every host.

One ``oauth_tokens`` row per company. ``refresh`` runs in one transaction holding the row's lock
(``SELECT … FOR UPDATE`` on PostgreSQL; a process lock as well, which is all SQLite's embedded
mode needs): it re-reads the row, returns the token another worker stored while this one
waited, or calls the token endpoint and stores its answer — the rotated refresh token included —
and commits before the new access token leaves this module. So at most one worker per company
spends a refresh token, and the refresh token in the row is always the provider's current one
(unless a worker dies between the provider's answer and the commit: the provider then sees the
old token again and revokes the grant, which ``upstream_auth`` reports).

Tokens are sealed with a ``Sealer`` — the worker passes ``pipeline.secrets.SecretBox``: Fernet
under ``PIPELINE_SECRETS_KEY``, the key that seals every tenant secret, so ``pipeline secrets
rotate``'s keys open them too. Expiries are kept in UTC; the 60 s refresh margin absorbs the clock skew of
NTP-synchronised hosts.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from sqlalchemy import Connection, Engine, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError

from connectors.oauth2 import AccessToken, Obtain, UpstreamAuthError
from pipeline.errors import ConfigError, UpstreamError
from pipeline.models import OAUTH_TOKENS

if TYPE_CHECKING:
    from pipeline.runtime import Runtime
    from pipeline.secrets import SecretBox


LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL: lock_timeout expired


class Sealer(Protocol):
    """Encrypts a secret into ``{"$secret": token}`` and back (``pipeline.secrets.SecretBox``)."""

    def seal(self, value: str) -> dict[str, str]: ...

    def open(self, sealed: Mapping[str, Any], *, where: str = "config") -> str: ...


class DatabaseTokenStore:
    """``TokenStore`` for one company on the pipeline's database (see the module docstring).

    Parameters:
        engine: the pipeline's engine (PostgreSQL, or SQLite in the embedded mode).
        company_id: whose tokens.
        sealer: seals the tokens at rest.
        lock_wait_s: how long a refresh waits for another worker's refresh of the same company
            before it gives up with a retryable ``UpstreamError`` (a hung token endpoint must
            not hold every task of the company for longer than a lease).
    """

    # Serialises refreshes within this process too (SQLite ignores FOR UPDATE).
    _process_locks: ClassVar[dict[int, threading.Lock]] = {}
    _locks_guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, engine: Engine, company_id: int, *, sealer: Sealer, lock_wait_s: float = 60.0) -> None:
        self.engine = engine
        self.company_id = company_id
        self.sealer = sealer
        self.lock_wait_s = lock_wait_s

    def _process_lock(self) -> threading.Lock:
        with self._locks_guard:
            return self._process_locks.setdefault(self.company_id, threading.Lock())

    def _token(self, row: Any) -> AccessToken | None:
        if row.access_token is None:
            return None
        value = self.sealer.open(row.access_token, where=f"oauth_tokens of company {self.company_id}")
        left = None if row.expires_at is None else (row.expires_at - datetime.now(UTC)).total_seconds()
        return AccessToken(value, left)

    def current(self, grant: str) -> AccessToken | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(OAUTH_TOKENS).where(OAUTH_TOKENS.c.company_id == self.company_id)).first()
        if row is None or row.grant_fingerprint != grant or row.revoked_reason is not None:
            return None
        return self._token(row)

    def _busy(self) -> UpstreamError:
        return UpstreamError(
            f"company {self.company_id}: another worker's OAuth2 token refresh has held the lock for over "
            f"{self.lock_wait_s:g}s (is the token endpoint hanging?)", retryable=True)

    def refresh(self, grant: str, *, stale: str | None, obtain: Obtain) -> AccessToken:
        lock = self._process_lock()
        if not lock.acquire(timeout=self.lock_wait_s):
            raise self._busy()
        try:
            return self._refresh(grant, stale=stale, obtain=obtain)
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE:
                raise self._busy() from None
            raise
        finally:
            lock.release()

    def _refresh(self, grant: str, *, stale: str | None, obtain: Obtain) -> AccessToken:
        table = OAUTH_TOKENS
        mine = table.c.company_id == self.company_id
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        with self.engine.connect() as conn:
            with conn.begin():
                if self.engine.dialect.name == "postgresql":
                    conn.execute(text(f"SET LOCAL lock_timeout = '{int(self.lock_wait_s * 1000)}ms'"))
                conn.execute(
                    insert(table)
                    .values(company_id=self.company_id, grant_fingerprint=grant, refreshes=0,
                            updated_at=datetime.now(UTC))
                    .on_conflict_do_nothing(index_elements=["company_id"])
                )
                row = conn.execute(select(table).where(mine).with_for_update()).one()
                if row.grant_fingerprint != grant:
                    # Re-authorized: a new grant in the config; what the row holds is the old one's.
                    conn.execute(update(table).where(mine).values(
                        grant_fingerprint=grant, access_token=None, expires_at=None, refresh_token=None,
                        revoked_reason=None, updated_at=datetime.now(UTC)))
                    row = conn.execute(select(table).where(mine)).one()
                if row.revoked_reason is not None:
                    raise UpstreamAuthError(row.revoked_reason)
                held = self._token(row)
                if held is not None and held.value != stale and held.fresh():
                    return held  # another worker refreshed while this one waited for the lock
                where = f"oauth_tokens of company {self.company_id}"
                refresh_token = self.sealer.open(row.refresh_token, where=where) if row.refresh_token else None
                try:
                    answer = obtain(refresh_token)
                except UpstreamAuthError as exc:
                    revoked: UpstreamAuthError | None = exc
                else:
                    revoked = None
                    expires_at = (None if answer.expires_in_s is None
                                  else datetime.now(UTC) + timedelta(seconds=answer.expires_in_s))
                    conn.execute(update(table).where(mine).values(
                        access_token=self.sealer.seal(answer.access_token),
                        expires_at=expires_at,
                        refresh_token=(self.sealer.seal(answer.refresh_token) if answer.refresh_token
                                       else row.refresh_token),
                        refreshes=table.c.refreshes + 1,
                        updated_at=datetime.now(UTC),
                    ))
                if revoked is not None:
                    # Recorded (and committed on leaving the block) so the company's other tasks
                    # fail at once instead of presenting the refused token again.
                    conn.execute(update(table).where(mine).values(
                        revoked_reason=str(revoked), access_token=None, expires_at=None,
                        updated_at=datetime.now(UTC)))
            # Committed: only now may the new access token be used.
            if revoked is not None:
                raise revoked
            return AccessToken(answer.access_token, answer.expires_in_s)


def token_store(rt: Runtime, company_id: int) -> DatabaseTokenStore:
    """The token store a worker passes to a company's connector."""
    return DatabaseTokenStore(rt.engine, company_id, sealer=rt.secrets)


def rotate_sealed_tokens(conn: Connection, box: SecretBox) -> int:
    """Re-encrypt every stored OAuth2 token under ``box``'s first key, on ``conn``'s transaction
    (``pipeline secrets rotate`` calls it with the companies' secrets). Returns how many.

    Raises:
        ConfigError: a stored token no key decrypts, naming the company.
    """
    table = OAUTH_TOKENS
    count = 0
    rows = conn.execute(select(table.c.company_id, table.c.access_token, table.c.refresh_token)
                        .order_by(table.c.company_id).with_for_update()).all()
    for company_id, access_token, refresh_token in rows:
        values: dict[str, Any] = {}
        for name, sealed in (("access_token", access_token), ("refresh_token", refresh_token)):
            if sealed is None:
                continue
            try:
                values[name] = box.rotate(sealed)
            except ConfigError as exc:
                raise ConfigError(f"company {company_id}, oauth_tokens.{name}: {exc}") from None
        if values:
            conn.execute(update(table).where(table.c.company_id == company_id).values(**values))
            count += len(values)
    return count
