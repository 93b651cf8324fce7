"""Companies (tenants): create, list, update — with the connector config validated first.

Before a config is stored, its secrets are encrypted (``pipeline.secrets``) and it is checked
against what the operator allows (``ConnectorContext``: environment variable prefix, upstream
addresses). Both default to the strictest: no key (so no inline secret), public addresses only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from connectors import registry
from connectors.base import ConnectorContext
from pipeline.db import transaction
from pipeline.errors import ConfigError, NotFound
from pipeline.models import Company, utcnow
from pipeline.secrets import SecretBox, keep_stored_secrets, refuse_sealed_input, seal_config, unseal


def prepare_config(
    connector: str,
    config: Mapping[str, Any],
    *,
    stored: Mapping[str, Any] | None = None,
    context: ConnectorContext | None = None,
    secrets: SecretBox | None = None,
) -> dict[str, Any]:
    """Validate ``config`` for ``connector`` and return what to store: its secrets sealed.

    ``stored`` is the config being replaced: the secrets ``config`` omits (or sends as ``"***"``)
    are kept from it.

    Raises:
        ConfigError: a bad key (named), a variable or address the operator does not allow, an
            inline secret without ``PIPELINE_SECRETS_KEY``.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"connector config must be a JSON object, got {type(config).__name__}")
    box = secrets or SecretBox(None)
    refuse_sealed_input(config)
    merged = keep_stored_secrets(config, stored) if stored else dict(config)
    plain = unseal(merged, box)
    paths = registry.validate(connector, plain, context=context)
    return seal_config(plain, paths, box)


class DuplicateCompany(ConfigError):
    """Another company already has this external id."""


def _unstorable(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (U+0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\ud800" escape decodes to a code point UTF-8 has no form for
        return "contains a lone surrogate (U+D800 to U+DFFF), which is not Unicode text and cannot be stored"
    return None


def unstorable_at(value: Any, path: str = "") -> str | None:
    """``"<key path>: <why>"`` for the first value (or key) PostgreSQL cannot store, or ``None``.

    PostgreSQL text and JSONB hold neither U+0000 nor a lone UTF-16 surrogate (which JSON can
    write as an escape), and JSONB no NaN or infinity (which Python's JSON parser reads from
    ``NaN``, ``Infinity`` or a number as large as ``1e400``), so such input is refused up front,
    naming where.
    """
    if isinstance(value, str):
        why = _unstorable(value)
        return f"{path or 'value'}: {why}" if why else None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path or 'value'}: is not a finite number (JSON numbers are; PostgreSQL stores no NaN or infinity)"
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key!s}" if path else str(key)
            why = _unstorable(key) if isinstance(key, str) else None
            if why:
                return f"{where.encode('utf-8', 'backslashreplace').decode()}: {why}"
            found = unstorable_at(item, where)
            if found:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = unstorable_at(item, f"{path}[{index}]")
            if found:
                return found
    return None


def _refuse_unstorable(**fields: Any) -> None:
    for name, value in fields.items():
        found = unstorable_at(value, name)
        if found:
            raise ConfigError(found)


# The columns' lengths (pipeline.models.Company), so that the CLI gets a message, not a DataError.
MAX_NAME = 200
MAX_EXTERNAL_ID = 200


def _check_name(name: str) -> None:
    if not name.strip():
        raise ConfigError("company name must not be empty")
    if len(name.strip()) > MAX_NAME:
        raise ConfigError(f"company name must be at most {MAX_NAME} characters, got {len(name.strip())}")


def validate_toggles(toggles: Any) -> dict[str, Any]:
    if not isinstance(toggles, Mapping):
        raise ConfigError(f"feature toggles must be a JSON object, got {type(toggles).__name__}")
    for name, value in toggles.items():
        if not isinstance(value, bool):
            raise ConfigError(f"feature toggle {name!r} must be true or false, got {value!r}")
    return dict(toggles)


def add_company(
    engine: Engine,
    *,
    name: str,
    connector: str,
    config: Mapping[str, Any],
    toggles: Mapping[str, Any] | None = None,
    external_id: str | None = None,
    enabled: bool = True,
    context: ConnectorContext | None = None,
    secrets: SecretBox | None = None,
) -> Company:
    """Create a company after validating its connector config (see ``prepare_config``).

    Raises:
        ConfigError: empty name, unknown connector, a bad config key (named), a variable or
            address not allowed, bad toggles, or a duplicate external id.
    """
    _check_name(name)
    if external_id is not None and len(external_id) > MAX_EXTERNAL_ID:
        raise ConfigError(f"external id must be at most {MAX_EXTERNAL_ID} characters, got {len(external_id)}")
    _refuse_unstorable(name=name, config=config, toggles=toggles, external_id=external_id)
    stored = prepare_config(connector, config, context=context, secrets=secrets)
    company = Company(
        name=name.strip(), connector=connector, connector_config=stored,
        feature_toggles=validate_toggles(toggles or {}), external_id=external_id, sync_enabled=enabled,
    )
    try:
        with transaction(engine) as session:
            session.add(company)
    except IntegrityError as exc:
        raise DuplicateCompany(f"a company with external id {external_id!r} already exists") from exc
    return company


def list_companies(engine: Engine) -> list[Company]:
    with transaction(engine) as session:
        return list(session.scalars(select(Company).order_by(Company.id)))


def get_company(engine: Engine, company_id: int) -> Company:
    with transaction(engine) as session:
        company = session.get(Company, company_id)
        if company is None:
            raise NotFound(f"company {company_id} does not exist")
        return company


def update_company(
    engine: Engine,
    company_id: int,
    *,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    toggles: Mapping[str, Any] | None = None,
    enabled: bool | None = None,
    context: ConnectorContext | None = None,
    secrets: SecretBox | None = None,
) -> Company:
    """Change a company; a new config is validated against its connector before it is stored,
    keeping the stored secrets it omits (see ``prepare_config``)."""
    _refuse_unstorable(name=name, config=config, toggles=toggles)
    with transaction(engine) as session:
        company = session.get(Company, company_id, with_for_update=True)
        if company is None:
            raise NotFound(f"company {company_id} does not exist")
        if name is not None:
            _check_name(name)
            company.name = name.strip()
        if config is not None:
            company.connector_config = prepare_config(
                company.connector, config, stored=company.connector_config or {}, context=context, secrets=secrets
            )
        if toggles is not None:
            company.feature_toggles = validate_toggles(toggles)
        if enabled is not None:
            company.sync_enabled = enabled
        company.updated_at = utcnow()
        return company
