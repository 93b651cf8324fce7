"""Run the API under uvicorn: what ``pipeline serve`` calls."""

from __future__ import annotations

import copy
import os
from typing import Any

import uvicorn

from pipeline.api.app import FACTORY
from pipeline.auth import check_token_settings
from pipeline.settings import Settings, settings_environment

__all__ = ["log_config", "serve", "settings_environment"]


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config with the ``pipeline`` loggers added at ``level``."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["pipeline"] = {"handlers": ["default"], "level": level, "propagate": False}
    config["loggers"]["uvicorn"]["level"] = level
    return config


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    access_log: bool = False,
    app: str = FACTORY,
) -> None:
    """Serve the API until interrupted.

    Workers are separate processes started from the import string ``FACTORY``; each builds its
    own runtime from the environment, which is why ``settings`` is exported to ``PIPELINE_*``
    variables first (this is the process edge, so writing the environment is fine here).

    Parameters:
        settings: the validated settings (log level, database, blob store, JWT secret).
        host: interface to bind.
        port: TCP port.
        workers: worker processes; one per core is a good start.
        access_log: log one line per request (off by default: it costs throughput).
        app: import string of an app factory (the benchmark serves its own, with extra routes).

    Raises:
        ConfigError: no usable JWT secret nor JWKS URL (checked before any worker starts).
    """
    check_token_settings(settings)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    os.environ.update(settings_environment(settings))
    uvicorn.run(
        app,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
        log_config=log_config(settings.log_level),
        access_log=access_log,
        server_header=False,
    )
