"""The declarative REST connector ``rest``: config, paginators, HTTP and the connector itself.

Importing this package registers ``"rest"`` with ``connectors.registry``.
"""

from connectors.registry import register
from connectors.rest.config import RestConfig, parse_config
from connectors.rest.connector import RestConnector

register("rest", RestConnector, config_model=RestConfig)

__all__ = ["RestConfig", "RestConnector", "parse_config"]
