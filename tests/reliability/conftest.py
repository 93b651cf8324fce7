"""Fixtures of the reliability suite: one ``Harness`` (a real stack and a worker fleet) per test.

Every fault test runs at two sizes: ``ci`` (2,000 tasks; the whole suite in a few minutes on
two cores) and ``soak`` (10,000 tasks, longer outages), selected with ``pytest -m soak``.
Soak runs are left out unless a ``-m`` expression asks for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.migrate import upgrade
from tests.reliability.harness import CI, SOAK, Harness, Size, build_harness, teardown_harness
from tests.services import S3Service

SIZES = [pytest.param(CI, id="ci"), pytest.param(SOAK, id="soak", marks=pytest.mark.soak)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("markexpr"):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("soak") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def make_harness(
    make_database: Callable[[], str], amqp_url: str, s3_service: S3Service, s3_bucket: str, tmp_path: Path,
) -> Iterator[Callable[..., Harness]]:
    """Factory: ``make_harness(size, **settings_overrides)`` builds this test's stack (once)."""
    built: list[Harness] = []

    def make(size: Size, **overrides: object) -> Harness:
        assert not built, "one harness per test"
        database_url = make_database()
        upgrade(database_url)
        harness = build_harness(size, database_url=database_url, amqp_url=amqp_url, s3=s3_service,
                                bucket=s3_bucket, log_dir=tmp_path, **overrides)
        built.append(harness)
        return harness

    yield make
    for harness in built:
        teardown_harness(harness)
        logging.getLogger(__name__).info("timings: %s", harness.timings)
