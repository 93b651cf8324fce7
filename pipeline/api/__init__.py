"""The HTTP API: the read endpoints (``read``), error mapping (``errors``) and the app factory (``app``)."""

from pipeline.api.app import create_app, create_app_from_env

__all__ = ["create_app", "create_app_from_env"]
