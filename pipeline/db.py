"""Engines and sessions for PostgreSQL (the real stack) and SQLite (the embedded default)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker


def normalize_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL URLs that name no driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


PREPARE_THRESHOLD = 2


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets WAL, foreign keys and a busy timeout for concurrent writers.

    PostgreSQL engines ping a pooled connection before handing it out unless ``pool_pre_ping=False``
    — the workers' choice (``Runtime.from_settings(..., pre_ping=False)``): a ping is one more
    round trip per transaction, and a connection broken by a database restart fails its first
    statement instead, which makes SQLAlchemy discard the whole pool (every connection opened
    before the error reconnects on its next checkout) while the attempt's outage is retried.
    """
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Python's sqlite3 opens transactions lazily; BEGIN IMMEDIATE is issued below so
            # that concurrent writers queue on the busy timeout instead of failing to upgrade.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    # psycopg 3 prepares a statement server-side once it has run this many times on a connection:
    # the worker's few hot statements (claim, publish) are parsed and planned once per connection.
    connect_args = {"prepare_threshold": PREPARE_THRESHOLD, **kwargs.pop("connect_args", {})}
    return create_engine(url, connect_args=connect_args, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """One session in one transaction: committed on success, rolled back on any error."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    """A pooled connection in autocommit: each statement is its own transaction, with no BEGIN
    or COMMIT round trip (the worker's one-statement claim and publish)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn


@contextmanager
def driver_autocommit(engine: Engine) -> Iterator[psycopg.Connection[Any]]:
    """A pooled PostgreSQL connection's own psycopg connection, in autocommit, for the worker's
    hot statements (the claim, the publish): plain SQL with psycopg ``%(name)s`` parameters.

    The statements go straight to psycopg: SQLAlchemy's execution context cost three to four
    times a statement's own client CPU (about 90 µs against 20 µs; docs/benchmarks.md, issue
    13). A psycopg error raised in the block comes out as SQLAlchemy would raise it (a
    ``DBAPIError`` subclass, so callers classify it as before), and a lost connection is handled
    as SQLAlchemy handles it: the whole pool is invalidated, so every connection opened before
    the error reconnects on its next checkout. A block that fails otherwise with the connection
    in doubt calls ``invalidate`` on it (see ``_release`` in ``pipeline.datasets``).

    Raises:
        sqlalchemy.exc.DBAPIError: the database refused a statement or is unreachable.
    """
    try:
        pooled = engine.raw_connection()
    except psycopg.Error as exc:
        # raw_connection() raises the driver's own error when it cannot connect (engine.connect()
        # wraps it): wrap it as SQLAlchemy would, so a database that is down or shutting down is
        # classified as an outage like any other connection failure, never left unclassified.
        raise DBAPIError.instance(None, None, exc, psycopg.Error, connection_invalidated=True,
                                  dialect=engine.dialect) from exc
    connection = pooled.driver_connection
    assert isinstance(connection, psycopg.Connection)
    try:
        try:
            connection.autocommit = True
            try:
                yield connection
            finally:
                if not connection.closed:
                    connection.autocommit = False
        except psycopg.Error as exc:
            lost = engine.dialect.is_disconnect(exc, connection, None)  # type: ignore[arg-type]
            if lost:
                engine.pool._invalidate(pooled, exc)  # what SQLAlchemy does on a disconnect
            raise DBAPIError.instance(None, None, exc, psycopg.Error, connection_invalidated=lost,
                                      dialect=engine.dialect) from exc
    finally:
        if connection.closed and pooled.dbapi_connection is not None:
            pooled.invalidate()  # closed in the block (and not invalidated yet): the pool opens a new one
        pooled.close()


def execute_one(engine: Engine, sql: str, params: dict[str, Any]) -> Any:
    """Run one statement in autocommit (``driver_autocommit``); its first row as a named tuple,
    or ``None``."""
    with driver_autocommit(engine) as connection:
        cursor: psycopg.Cursor[Any] = connection.cursor(row_factory=namedtuple_row)
        with cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()
