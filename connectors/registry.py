"""Connector registry: name → factory. Concrete connectors register on import."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connectors.base import Connector, ConnectorFactory, RateLimiter, ResponseHook
from errors import ConfigError

_FACTORIES: dict[str, ConnectorFactory] = {}


def register(name: str, factory: ConnectorFactory) -> None:
    _FACTORIES[name] = factory


def names() -> list[str]:
    _load_builtin()
    return sorted(_FACTORIES)


def build(
    name: str, config: Mapping[str, Any], *, limiter: RateLimiter | None = None,
    on_response: ResponseHook | None = None,
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
    return factory(config, limiter=limiter, on_response=on_response)


def validate(name: str, config: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` unless ``config`` is valid for connector ``name``."""
    build(name, config).close()


def _load_builtin() -> None:
    # Imported lazily so that importing the registry never drags in every connector's deps.
    import connectors.synthetic

    try:
        import connectors.rest  # noqa: F401
    except ImportError:  # the REST connector is optional until it lands
        pass
