"""Fixtures of the reliability suite: one ``Harness`` (a real stack and a worker fleet) per test.

Every fault test runs at two sizes (``harness.SIZES``): ``ci`` (400 tasks per fault; the nine
faults in about four minutes on two cores) and ``soak`` (2,000 tasks, longer outages), selected
with ``pytest -m soak``. Soak runs are left out unless a ``-m`` expression asks for them.
"""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.migrate import upgrade
from storage.seaweed import SeaweedFS
from tests import services
from tests.reliability.harness import Harness, Size, build_harness, teardown_harness
from tests.services import S3Service


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("markexpr"):
        return
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        (dropped if item.get_closest_marker("soak") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def reliability_s3(s3_service: S3Service) -> S3Service:
    """The session's S3 server (``PIPELINE_S3_ENDPOINT``, MinIO in Docker, else SeaweedFS, which
    runs in a process of its own, so thousands of uploads do not compete with the harness)."""
    return s3_service


@pytest.fixture
def killable_s3(tmp_path: Path) -> Iterator[SeaweedFS]:
    """A SeaweedFS server of the test's own, which it may SIGKILL and start again on the same
    data directory and ports (whatever S3 service the rest of the session uses)."""
    with services.seaweed(tmp_path / "seaweedfs") as server:
        yield server


@pytest.fixture
def make_harness(
    make_database: Callable[[], str], amqp_url: str, reliability_s3: S3Service, tmp_path: Path,
) -> Iterator[Callable[..., Harness]]:
    """Factory: ``make_harness(size, s3=None, **settings_overrides)`` builds this test's stack
    (once), on ``s3`` when given (a server the test owns), else on the session's S3 server.

    Some tests restart the machine's shared RabbitMQ and PostgreSQL, so two test sessions on
    one machine take turns: each reliability test holds a lock file for its duration.
    """
    built: list[Harness] = []
    lock = (Path(tempfile.gettempdir()) / "pipeline-reliability.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)

    def make(size: Size, *, s3: S3Service | None = None, **overrides: object) -> Harness:
        assert not built, "one harness per test"
        database_url = make_database()
        upgrade(database_url)
        bucket = services.unique_name("pipeline-rel", separator="-")
        server = s3 or reliability_s3
        services.create_bucket(server, bucket)
        harness = build_harness(size, database_url=database_url, amqp_url=amqp_url, s3=server,
                                bucket=bucket, log_dir=tmp_path, **overrides)
        built.append(harness)
        return harness

    yield make
    for harness in built:
        teardown_harness(harness)
        services.remove_bucket(harness.s3, harness.bucket)
        print(f"\n{harness.size.name} timings: {harness.timings}")
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()
