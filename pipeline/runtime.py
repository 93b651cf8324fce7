"""The runtime: settings plus the connections built from them, created once at the edge."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from sqlalchemy import Engine

from connectors.base import ConnectorContext
from connectors.net import NetworkPolicy
from pipeline.db import make_engine
from pipeline.secrets import SecretBox
from pipeline.settings import Settings
from storage.base import BlobStore


class PrefixedEnviron(Mapping[str, str]):
    """The variables of ``source`` whose names start with ``prefix`` (and never ``PIPELINE_*``),
    read live: all a connector config can reach of the process environment."""

    def __init__(self, source: Mapping[str, str], prefix: str) -> None:
        self._source = source
        self._prefix = prefix

    def _allowed(self, name: str) -> bool:
        return name.startswith(self._prefix) and not name.startswith("PIPELINE_")

    def __getitem__(self, name: str) -> str:
        if not self._allowed(name):
            raise KeyError(name)
        return self._source[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name in list(self._source) if self._allowed(name))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"PrefixedEnviron(prefix={self._prefix!r})"


def connector_context(settings: Settings, environ: Mapping[str, str]) -> ConnectorContext:
    """What tenants' connectors may reach under ``settings``, reading variables from ``environ``."""
    network = NetworkPolicy.parse(settings.upstream_allowlist,
                                  max_response_bytes=settings.upstream_max_response_bytes)
    prefix = settings.connector_env_prefix
    return ConnectorContext(environ=PrefixedEnviron(environ, prefix), env_prefix=prefix, network=network)


@dataclass
class Runtime:
    """What every domain function needs: passed down explicitly, never read from globals."""

    settings: Settings
    engine: Engine
    store: BlobStore
    # Where connector configs' ``token_env``/``value_env`` are read (only the allowed prefix).
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    @cached_property
    def connector_context(self) -> ConnectorContext:
        return connector_context(self.settings, self.environ)

    @cached_property
    def secrets(self) -> SecretBox:
        return SecretBox.from_settings(self.settings)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, environ: Mapping[str, str] | None = None, pre_ping: bool = True
    ) -> Runtime:
        """Open the connections ``settings`` name; ``environ`` (default: this process's, read at
        this edge only) is where connector secrets named by variable are found; ``pre_ping=False``
        for workers (see ``pipeline.db.make_engine``)."""
        from storage.factory import open_store

        store = open_store(
            settings.blob_url,
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
        engine = make_engine(settings.database_url, **({} if pre_ping else {"pool_pre_ping": False}))
        return cls(settings=settings, engine=engine, store=store, environ=os.environ if environ is None else environ)

    def close(self) -> None:
        self.engine.dispose()
