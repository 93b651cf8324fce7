"""The runtime: settings plus the connections built from them, created once at the edge."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from pipeline.db import make_engine
from pipeline.settings import Settings
from storage.base import BlobStore


@dataclass
class Runtime:
    """What every domain function needs: passed down explicitly, never read from globals."""

    settings: Settings
    engine: Engine
    store: BlobStore

    @classmethod
    def from_settings(cls, settings: Settings, *, pre_ping: bool = True) -> Runtime:
        """The runtime of ``settings``; ``pre_ping=False`` for workers (see ``pipeline.db.make_engine``)."""
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
        return cls(settings=settings, engine=engine, store=store)

    def close(self) -> None:
        self.engine.dispose()
