"""Rate limits per upstream: in one process, and shared through PostgreSQL by processes and hosts."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine

from connectors.rest.ratelimit import LocalRateLimiter, PostgresRateLimiter, make_rate_limiter
from pipeline.db import make_engine
from pipeline.models import Base
from tests.connectors.support import drain
from tests.fakes.upstreams import LinkApi

ITEMS_PER_WORKER = 8


@pytest.fixture(scope="module")
def rate_limit_engine(make_database: Callable[[], str]) -> Iterator[Engine]:
    """One new database for this module; every test uses its own upstream keys in it."""
    engine = make_engine(make_database())
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_local_limiter_spaces_slots_across_threads() -> None:
    limiter = LocalRateLimiter(margin=0)
    returned: list[float] = []
    lock = threading.Lock()

    def take(count: int) -> None:
        for _ in range(count):
            limiter.acquire("https://api.example.com", 50)
            with lock:
                returned.append(time.monotonic())

    start = time.monotonic()
    threads = [threading.Thread(target=take, args=(4,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(returned) == 12
    for index, moment in enumerate(sorted(returned)):
        assert moment >= start + index * 0.02
    assert limiter.reserve("https://other.example.com", 50) == 0


def test_postgres_limiter_hands_out_consecutive_slots_per_key(rate_limit_engine: Engine) -> None:
    limiter = PostgresRateLimiter(rate_limit_engine, margin=0)
    first = time.monotonic()
    waits = []
    for _ in range(5):
        waits.append((limiter.reserve("https://slots.example.com", 10), time.monotonic()))
    for index, (wait, at) in enumerate(waits):
        expected = index * 0.1 - (at - first)
        assert expected - 0.05 <= wait <= expected + 0.05
    assert limiter.reserve("https://other-slots.example.com", 10) == 0


def test_make_rate_limiter_uses_the_database_only_on_postgresql(rate_limit_engine: Engine) -> None:
    assert isinstance(make_rate_limiter(rate_limit_engine), PostgresRateLimiter)
    sqlite = make_engine("sqlite://")
    assert isinstance(make_rate_limiter(sqlite), LocalRateLimiter)
    sqlite.dispose()


def sync_through_shared_limiter(base_url: str, database_url: str, worker: str) -> None:
    """One worker process: fetch every item, one request per page, limited to 5 requests/s."""
    engine = make_engine(database_url)
    try:
        config = {
            "base_url": base_url,
            "rate_limit": {"requests_per_second": 5},
            "pages_per_chunk": 4,
            "resources": {
                "items": {
                    "path": "/items",
                    "params": {"per_page": 1, "worker": worker},
                    "primary_key": "id",
                    "paginator": {"type": "link"},
                }
            },
        }
        chunks = drain(config, "items", limiter=PostgresRateLimiter(engine))
        assert sum(len(chunk.records) for chunk in chunks) == ITEMS_PER_WORKER
    finally:
        engine.dispose()


def test_two_processes_never_exceed_the_upstream_limit(rate_limit_engine: Engine) -> None:
    database_url = rate_limit_engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    with LinkApi(ITEMS_PER_WORKER) as api:
        workers = [
            context.Process(target=sync_through_shared_limiter, args=(api.base_url, database_url, name))
            for name in ("a", "b")
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert [worker.exitcode for worker in workers] == [0, 0]
        served = api.requests

    assert len(served) == 2 * ITEMS_PER_WORKER
    assert {entry.status for entry in served} == {200}
    times = sorted(entry.at for entry in served)
    busiest = max(sum(1 for other in times if start <= other < start + 1.0) for start in times)
    assert busiest <= 5
    assert busiest >= 4, "the limiter throttles far below the configured rate"
    by_worker = {name: [entry.at for entry in served if entry.params["worker"] == name] for name in ("a", "b")}
    assert min(by_worker["a"]) < max(by_worker["b"]) and min(by_worker["b"]) < max(by_worker["a"]), (
        "the two processes did not run at the same time"
    )
