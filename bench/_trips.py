"""Round trips per task: the deterministic part of a task's cost.

On a shared 2-core machine the wall time of a task swings with the load; the number of
database round trips and S3 requests it makes does not. ``probe`` runs a few tasks in this
process on the bench's services and counts, per task: SQL statements, transaction commands
(BEGIN / COMMIT / ROLLBACK) and pool pre-pings — each one a round trip to PostgreSQL — and
requests to the blob store.

Everything is counted on psycopg 3 itself (its cursor's ``execute``, its connection's ``commit``
and ``rollback``), whoever calls it: SQLAlchemy, or the worker's hot path that uses the pooled
connection's psycopg cursor directly. psycopg sends BEGIN only just before the first statement
of a transaction (never in autocommit), and COMMIT or ROLLBACK only when the server reports a
transaction open (``Connection._start_query``, ``_commit_gen`` and ``_rollback_gen`` return early
otherwise). So BEGIN is counted at the statement that makes psycopg send it, and a COMMIT or
ROLLBACK on an idle connection (SQLAlchemy's reset on return to the pool) is counted apart
(``no-op commit`` / ``no-op rollback``), not as a round trip.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Engine

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
    """Count the round trips of every psycopg connection of this process while the block runs.

    Counted on psycopg itself, not on SQLAlchemy's events: the worker's hot statements (the
    claim, the publish) go straight to the pooled connection's psycopg cursor
    (``pipeline.db.driver_autocommit``), which SQLAlchemy's events never see. A pool pre-ping
    is a statement too, so it is counted with them.
    """
    execute = psycopg.Cursor.execute
    commit = psycopg.Connection.commit
    rollback = psycopg.Connection.rollback

    def counted_execute(cursor: Any, *args: Any, **kwargs: Any) -> Any:
        connection = cursor.connection
        if not connection.autocommit and connection.info.transaction_status == IDLE:
            counts["begin"] += 1  # psycopg sends BEGIN just before this statement
        counts["statements"] += 1
        return execute(cursor, *args, **kwargs)

    def command(name: str, original: Callable[..., None]) -> Callable[..., None]:
        def count(connection: Any) -> None:
            counts[name if connection.info.transaction_status != IDLE else f"no-op {name}"] += 1
            original(connection)

        return count

    psycopg.Cursor.execute = counted_execute  # type: ignore[method-assign,assignment]
    psycopg.Connection.commit = command("commit", commit)  # type: ignore[method-assign]
    psycopg.Connection.rollback = command("rollback", rollback)  # type: ignore[method-assign]
    try:
        yield
    finally:
        psycopg.Cursor.execute = execute  # type: ignore[method-assign]
        psycopg.Connection.commit = commit  # type: ignore[method-assign]
        psycopg.Connection.rollback = rollback  # type: ignore[method-assign]


IDLE = psycopg.pq.TransactionStatus.IDLE


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
