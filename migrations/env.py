"""Alembic environment: PostgreSQL for the real stack, SQLite for the embedded default.

The URL comes from the config built by :func:`pipeline.migrate.alembic_config`; run through
the ``alembic`` command (repo-root ``alembic.ini``, which names no URL) it comes from the
``PIPELINE_*`` settings instead.
"""

from __future__ import annotations

import logging.config
from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext
from alembic.operations.ops import MigrationScript
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, event, pool, text
from sqlalchemy.engine import make_url

import pipeline.models
from pipeline.db import normalize_url
from pipeline.migrate import DATABASE_URL_ATTRIBUTE, MIGRATION_LOCK_KEY
from pipeline.settings import load_settings

config = context.config
target_metadata = pipeline.models.Base.metadata

if config.config_file_name is not None and config.file_config.has_section("loggers"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = config.attributes.get(DATABASE_URL_ATTRIBUTE) or config.get_main_option("sqlalchemy.url")
    return normalize_url(url or load_settings().database_url)


# Autogenerate writes these shared types by name, so new revisions stay in step with the models
# (and avoid Alembic's rendering of JSONB, which references a bare ``Text`` it does not import).
_SHARED_TYPES = {"JSONType": pipeline.models.JSONType, "BigId": pipeline.models.BigId}


def _variants(type_: object) -> tuple[type, dict[str, type]]:
    mapping = getattr(type_, "_variant_mapping", {})
    return type(type_), {dialect: type(variant) for dialect, variant in mapping.items()}


def render_item(kind: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    if kind == "type":
        for name, shared in _SHARED_TYPES.items():
            if _variants(obj) == _variants(shared):
                return f"pipeline.models.{name}"
        if isinstance(obj, pipeline.models.UTCDateTime):
            return "pipeline.models.UTCDateTime()"
    return False


def skip_empty_revision(
    _context: MigrationContext, _revision: Any, directives: list[MigrationScript]
) -> None:
    """``alembic revision --autogenerate`` with no model change writes no file."""
    if config.cmd_opts is not None and getattr(config.cmd_opts, "autogenerate", False):
        script = directives[0]
        if script.upgrade_ops is not None and script.upgrade_ops.is_empty():
            directives[:] = []


def configure_options(dialect_name: str) -> dict[str, Any]:
    sqlite = dialect_name == "sqlite"
    return {
        "target_metadata": target_metadata,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        "render_as_batch": sqlite,
        # SQLite's DDL is transactional once pysqlite stops managing transactions (see
        # make_migration_engine): one transaction for the whole run, as on PostgreSQL.
        "transactional_ddl": True if sqlite else None,
        "compare_type": True,
        "compare_server_default": True,
        "render_item": render_item,
        "process_revision_directives": skip_empty_revision,
    }


def make_migration_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, poolclass=pool.NullPool)
    # Foreign keys stay off (SQLite's default): a batch rebuild drops and recreates tables,
    # which with them on would cascade-delete child rows. Transactions are made explicit so
    # that DDL is transactional and BEGIN IMMEDIATE queues a concurrent `pipeline migrate`
    # behind this one instead of letting both create the same tables.
    engine = create_engine(url, poolclass=pool.NullPool, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _manual_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, **configure_options(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_migration_engine(database_url())
    try:
        with engine.connect() as connection:
            if connection.dialect.name != "postgresql":
                run_migrations(connection)
                return
            # A session-level lock spans every migration transaction; a second `pipeline migrate`
            # waits here, then finds the schema at head and does nothing. On error the connection
            # closes (no pool), which releases the lock too.
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()
            run_migrations(connection)
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    url = make_url(database_url())
    context.configure(url=url, literal_binds=True, **configure_options(url.get_backend_name()))
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
