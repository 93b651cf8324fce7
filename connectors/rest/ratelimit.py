"""Rate limiters: space the requests to one upstream across threads, processes and hosts.

Both implementations hand out slots ``interval`` apart, where ``interval`` is
``(1 + margin) / requests_per_second``, and the caller sleeps until its slot. There is no
burst: after an idle period the next request goes at once, the one after it an interval later.
The slot is taken in the HTTP client's request hook (``connectors.rest.http``), for every request
sent, retries and an auth flow's re-sends included.

What is promised is about *send* times: no request is handed to the network before its slot,
and the slots of one key are ``interval`` apart across every thread, process and host.

The margin exists because the upstream counts requests when they *arrive*: a request sent on
its slot but delayed on the way (scheduling, network) must not let the next ones fall into one
of the upstream's one-second windows. ``rps`` intervals span ``1 + margin`` seconds, so a
request may be up to ``margin`` seconds later than the one after it before an upstream counting
"rps per second" sees one too many. The default 25 % tolerates 250 ms of jitter, which a loaded
2-core machine showed to be needed (10 % let a sixth request into one second at 5 req/s).
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from sqlalchemy import Engine, text

from connectors.base import RateLimiter
from errors import DeadlineExceeded

DEFAULT_MARGIN = 0.25

# One statement, so concurrent callers serialise on the row lock and each gets its own slot.
# clock_timestamp(), not now(): now() is frozen at transaction start, which is stale for a
# caller that waited on the row lock. The wait is counted from when the answer arrives, so the
# commit must not wait for the WAL flush (tens of milliseconds on a busy disk, added to one
# caller's send time and not the next one's): synchronous_commit is off for this transaction.
# A database crash can then forget the last slots handed out, which costs at most one burst.
_TAKE_SLOT = text(
    """
    INSERT INTO rate_limits AS bucket (key, next_slot)
    SELECT :key, clock_timestamp() + :interval
    FROM (SELECT set_config('synchronous_commit', 'off', true)) AS relaxed
    ON CONFLICT (key) DO UPDATE
        SET next_slot = GREATEST(bucket.next_slot, clock_timestamp()) + :interval
    RETURNING EXTRACT(EPOCH FROM (bucket.next_slot - :interval - clock_timestamp()))
    """
)


def _interval_s(requests_per_second: float, margin: float) -> float:
    if requests_per_second <= 0:
        raise ValueError(f"requests_per_second must be positive, got {requests_per_second}")
    return (1.0 + margin) / requests_per_second


class PostgresRateLimiter:
    """Slots kept in the ``rate_limits`` table, shared by every process on every host.

    The database clock decides, so hosts with skewed clocks still space their requests. Each
    ``acquire`` is one short transaction.

    Parameters:
        engine: a PostgreSQL engine whose database has the ``rate_limits`` table.
        margin: extra spacing as a fraction of ``1 / requests_per_second`` (see the module).
    """

    def __init__(self, engine: Engine, *, margin: float = DEFAULT_MARGIN) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError(f"PostgresRateLimiter needs PostgreSQL, not {engine.dialect.name}")
        self.engine = engine
        self.margin = margin

    def reserve(self, key: str, requests_per_second: float) -> float:
        """Take the next slot for ``key``; return how many seconds from now it starts (>= 0)."""
        interval = timedelta(seconds=_interval_s(requests_per_second, self.margin))
        with self.engine.begin() as connection:
            wait = connection.execute(_TAKE_SLOT, {"key": key, "interval": interval}).scalar_one()
        return max(0.0, float(wait))

    def acquire(self, key: str, requests_per_second: float, *, deadline: float | None = None) -> None:
        """Block until the caller may send one request to upstream ``key``, never past ``deadline``."""
        _wait(self.reserve(key, requests_per_second), key, deadline)


class LocalRateLimiter:
    """The same slots, kept in this process: for the embedded default (one process, SQLite)."""

    def __init__(self, *, margin: float = DEFAULT_MARGIN) -> None:
        self.margin = margin
        self._next_slot: dict[str, float] = {}
        self._lock = threading.Lock()

    def reserve(self, key: str, requests_per_second: float) -> float:
        """Take the next slot for ``key``; return how many seconds from now it starts (>= 0)."""
        interval = _interval_s(requests_per_second, self.margin)
        with self._lock:
            now = time.monotonic()
            slot = max(self._next_slot.get(key, now), now)
            self._next_slot[key] = slot + interval
        return slot - now

    def acquire(self, key: str, requests_per_second: float, *, deadline: float | None = None) -> None:
        """Block until the caller may send one request to upstream ``key``, never past ``deadline``."""
        _wait(self.reserve(key, requests_per_second), key, deadline)


def _wait(wait: float, key: str, deadline: float | None) -> None:
    """Sleep until the slot ``wait`` seconds away, unless it lies past ``deadline`` (defect 8:
    a rate-limit wait used to run past the attempt's deadline and its lease)."""
    if deadline is not None and time.monotonic() + wait > deadline:
        raise DeadlineExceeded(f"rate limit of {key}: the next slot is {wait:.1f}s away, past the attempt's deadline")
    if wait > 0:
        time.sleep(wait)


def make_rate_limiter(engine: Engine, *, margin: float = DEFAULT_MARGIN) -> RateLimiter:
    """``PostgresRateLimiter`` on PostgreSQL; ``LocalRateLimiter`` otherwise (SQLite has one writer
    process in the embedded default, so an in-process limiter is exact there)."""
    if engine.dialect.name == "postgresql":
        return PostgresRateLimiter(engine, margin=margin)
    return LocalRateLimiter(margin=margin)
