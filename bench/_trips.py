"""Round trips per task: the deterministic part of a task's cost.

On a shared 2-core machine the wall time of a task swings with the load; the number of
database round trips and S3 requests it makes does not. ``probe`` runs a few tasks in this
process on the bench's services and counts, per task: SQL statements, transaction commands
(BEGIN / COMMIT / ROLLBACK) and pool pre-pings — each one a round trip to PostgreSQL — and
requests to the blob store.

Transaction commands are counted when psycopg 3 sends them, not when SQLAlchemy announces them:
SQLAlchemy fires ``begin`` and ``rollback`` for an AUTOCOMMIT connection too (its autobegin, and
the rollback on release), but psycopg sends BEGIN only just before the first statement of a
transaction (never in autocommit), and COMMIT or ROLLBACK only when the server reports a
transaction open (``Connection._start_query``, ``_commit_gen`` and ``_rollback_gen`` return early
otherwise). So BEGIN is counted at the statement that makes psycopg send it, and a COMMIT or
ROLLBACK event on an idle connection is counted apart (``no-op commit`` / ``no-op rollback``),
not as a round trip.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Engine, event

from pipeline.runtime import Runtime
from storage.base import BlobStore

STORE_METHODS = ("put", "get", "open", "stat", "delete", "list")


class CountingStore:
    """A blob store that counts the requests made through it."""

    def __init__(self, inner: BlobStore, counts: Counter[str]) -> None:
        self._inner = inner
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name not in STORE_METHODS:
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._counts[f"s3 {name}"] += 1
            return attribute(*args, **kwargs)

        return counted


@contextmanager
def counting(engine: Engine, counts: Counter[str]) -> Iterator[None]:
    def statement(conn: Any, *_args: Any) -> None:
        dbapi = conn.connection.dbapi_connection
        if hasattr(dbapi, "info") and not dbapi.autocommit and dbapi.info.transaction_status == IDLE:
            counts["begin"] += 1  # psycopg sends BEGIN just before this statement
        counts["statements"] += 1

    def command(name: str) -> Callable[..., None]:
        def count(conn: Any, *_args: Any) -> None:
            counts[name if _sends(conn, name) else f"no-op {name}"] += 1

        return count

    def checkout(*_args: Any) -> None:
        if engine.pool._pre_ping:
            counts["pre-pings"] += 1

    hooks: list[tuple[Any, str, Callable[..., None]]] = [
        (engine, "before_cursor_execute", statement),
        (engine, "commit", command("commit")),
        (engine, "rollback", command("rollback")),
        (engine.pool, "checkout", checkout),
    ]
    for target, name, hook in hooks:
        event.listen(target, name, hook)
    try:
        yield
    finally:
        for target, name, hook in hooks:
            event.remove(target, name, hook)


IDLE = psycopg.pq.TransactionStatus.IDLE


def _sends(conn: Any, command: str) -> bool:
    """Whether psycopg will send COMMIT / ROLLBACK on this SQLAlchemy connection's DBAPI connection now."""
    dbapi = conn.connection.dbapi_connection
    if dbapi is None or not hasattr(dbapi, "info"):
        return True  # not psycopg 3: count it
    return bool(dbapi.info.transaction_status != IDLE)


@dataclass(frozen=True)
class Trips:
    tasks: int
    counts: Counter[str]

    def per_task(self, name: str) -> float:
        return self.counts[name] / self.tasks

    @property
    def database(self) -> float:
        return sum(self.per_task(name) for name in ("statements", "begin", "commit", "rollback", "pre-pings"))

    @property
    def storage(self) -> float:
        return sum(self.per_task(name) for name in self.counts if name.startswith("s3 "))

    def describe(self) -> str:
        details = ", ".join(f"{name} {self.per_task(name):.1f}" for name in sorted(self.counts))
        return f"{self.database:.1f} database round trips + {self.storage:.1f} blob requests per task ({details})"


def probe(rt: Runtime, run: Callable[[Runtime, int], object], task_ids: Sequence[int]) -> Trips:
    """Run ``task_ids`` one by one through ``run`` with counters on the database and the store."""
    counts: Counter[str] = Counter()
    counted = Runtime(settings=rt.settings, engine=rt.engine, store=CountingStore(rt.store, counts))
    with counting(rt.engine, counts):
        for task_id in task_ids:
            run(counted, task_id)
    return Trips(len(task_ids), counts)
