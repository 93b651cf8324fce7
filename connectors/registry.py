"""Connector registry: name → factory. Concrete connectors register on import."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from connectors.base import (
    ChecksAdmission,
    Connector,
    ConnectorContext,
    ConnectorFactory,
    RateLimiter,
    ResponseHook,
    SecretPath,
)
from connectors.oauth2 import TokenStore
from errors import ConfigError

_FACTORIES: dict[str, ConnectorFactory] = {}
_CONFIG_MODELS: dict[str, type[BaseModel]] = {}


def register(name: str, factory: ConnectorFactory, *, config_model: type[BaseModel] | None = None) -> None:
    """Make connector ``name`` buildable; ``config_model`` describes its config in the API's OpenAPI document."""
    _FACTORIES[name] = factory
    if config_model is not None:
        _CONFIG_MODELS[name] = config_model


def unregister(name: str) -> None:
    """Forget connector ``name`` (a test's scoped connector); unknown names are ignored."""
    _FACTORIES.pop(name, None)
    _CONFIG_MODELS.pop(name, None)


def config_models() -> dict[str, type[BaseModel] | None]:
    """Each connector's config model (``None`` for a connector that registered none), by name."""
    return {name: _CONFIG_MODELS.get(name) for name in names()}


def names() -> list[str]:
    _load_builtin()
    return sorted(_FACTORIES)


def build(
    name: str, config: Mapping[str, Any], *, limiter: RateLimiter | None = None,
    on_response: ResponseHook | None = None, context: ConnectorContext | None = None,
    tokens: TokenStore | None = None,
) -> Connector:
    """Build the connector ``name`` from a company's config.

    Raises:
        ConfigError: unknown connector, or a config key the connector rejects (named in the message).
    """
    _load_builtin()
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ConfigError(f"unknown connector {name!r} (known: {', '.join(names())})") from None
    if not isinstance(config, Mapping):
        raise ConfigError(f"connector config must be a JSON object, got {type(config).__name__}")
    return factory(config, limiter=limiter, on_response=on_response, context=context, tokens=tokens)


def validate(name: str, config: Mapping[str, Any], *, context: ConnectorContext | None = None) -> list[SecretPath]:
    """Check ``config`` for connector ``name`` as it is about to be stored.

    Parameters:
        context: what the operator allows (default: the strictest, see ``ConnectorContext``).

    Returns:
        Where the config holds secrets, to be encrypted before it is stored.

    Raises:
        ConfigError: naming the key that is invalid or reaches what ``context`` does not allow.
    """
    context = context or ConnectorContext()
    connector = build(name, config, context=context)
    try:
        if isinstance(connector, ChecksAdmission):
            connector.check_admission(context)
            return list(connector.secret_paths())
        return []
    finally:
        connector.close()


def _load_builtin() -> None:
    # Imported lazily so that importing the registry never drags in every connector's deps.
    import connectors.graphql
    import connectors.rest
    import connectors.synthetic  # noqa: F401
