"""The declarative GraphQL connector ``graphql``: config, paginators and the connector itself.

Importing this package registers ``"graphql"`` with ``connectors.registry``.
"""

from connectors.graphql.config import GraphQLConfig, parse_config
from connectors.graphql.connector import GraphQLConnector
from connectors.registry import register

register("graphql", GraphQLConnector, config_model=GraphQLConfig)

__all__ = ["GraphQLConfig", "GraphQLConnector", "parse_config"]
