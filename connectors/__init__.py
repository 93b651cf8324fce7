"""Connectors: the ``Connector`` protocol, the registry, and the concrete upstream adapters."""
