"""Schema migrations without an alembic.ini: Alembic configured in code from a database URL.

The scripts live in the importable ``migrations`` package, so an installed wheel (the Docker
image) migrates exactly like a checkout. ``migrations/env.py`` serialises concurrent runs on
PostgreSQL with an advisory lock (``MIGRATION_LOCK_KEY``), so ``pipeline migrate`` may start in
several processes at once.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

import migrations
from pipeline.db import normalize_url

# pg_advisory_lock key held by migrations/env.py for the whole run; any fixed bigint not used
# by another lock in this project (the scheduler's tick lock uses its own key).
MIGRATION_LOCK_KEY = 0x5059_4E43_4D49_4752  # "PYNCMIGR"

DATABASE_URL_ATTRIBUTE = "database_url"
SCRIPT_LOCATION = str(Path(migrations.__file__).parent)


def alembic_config(database_url: str) -> Config:
    """Build an Alembic config for ``database_url``, with the scripts of the ``migrations`` package.

    Parameters:
        database_url: any URL :func:`pipeline.db.normalize_url` accepts (``sqlite:///…``,
            ``postgresql://…``); it reaches ``env.py`` unchanged, ``%`` included.

    Returns:
        A config usable with every ``alembic.command`` function.
    """
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    # ConfigParser interpolates "%": a URL-encoded password ("p%40ss") must be escaped.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes[DATABASE_URL_ATTRIBUTE] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (default: the newest). Safe to run twice or concurrently."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Migrate the database down to ``revision`` (default: ``base``, which drops every table)."""
    command.downgrade(alembic_config(database_url), revision)


def current(database_url: str) -> str | None:
    """The revision the database is at, or ``None`` when it was never migrated (or is at base)."""
    engine = create_engine(normalize_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    """The newest revision in the ``migrations`` package: a database at it is up to date."""
    revision = ScriptDirectory(SCRIPT_LOCATION).get_current_head()
    if revision is None:  # pragma: no cover - the package always ships 0001
        raise RuntimeError("the migrations package has no revisions")
    return revision
