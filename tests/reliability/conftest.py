"""Fixtures of the reliability suite: one ``Harness`` (a real stack and a worker fleet) per test.

Every fault test runs at two sizes (``harness.SIZES``): ``ci`` (400 tasks per fault; the nine
faults in about four minutes on two cores) and ``soak`` (2,000 tasks, longer outages), selected
with ``pytest -m soak``. Soak runs are left out unless a ``-m`` expression asks for them.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.migrate import upgrade
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
def reliability_s3(request: pytest.FixtureRequest) -> Iterator[S3Service]:
    """The S3 server: ``PIPELINE_S3_ENDPOINT`` (or MinIO in Docker) as for every test; otherwise
    moto in a process of its own rather than in the test process, because a few thousand
    uploads per test would otherwise compete with the harness for one interpreter lock."""
    if os.environ.get("PIPELINE_S3_ENDPOINT") or services.docker_available():
        yield request.getfixturevalue("s3_service")
        return
    port = services.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        services.wait_for(lambda: services.port_open("127.0.0.1", port), timeout=30, what="moto's S3 server")
        yield S3Service(f"127.0.0.1:{port}", "testing", "testing")
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def make_harness(
    make_database: Callable[[], str], amqp_url: str, reliability_s3: S3Service, tmp_path: Path,
) -> Iterator[Callable[..., Harness]]:
    """Factory: ``make_harness(size, **settings_overrides)`` builds this test's stack (once).

    Some tests restart the machine's shared RabbitMQ and PostgreSQL, so two test sessions on
    one machine take turns: each reliability test holds a lock file for its duration.
    """
    built: list[Harness] = []
    lock = (Path(tempfile.gettempdir()) / "pipeline-reliability.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)

    def make(size: Size, **overrides: object) -> Harness:
        assert not built, "one harness per test"
        database_url = make_database()
        upgrade(database_url)
        bucket = services.unique_name("pipeline-rel", separator="-")
        services.create_bucket(reliability_s3, bucket)
        harness = build_harness(size, database_url=database_url, amqp_url=amqp_url, s3=reliability_s3,
                                bucket=bucket, log_dir=tmp_path, **overrides)
        built.append(harness)
        return harness

    yield make
    for harness in built:
        teardown_harness(harness)
        services.remove_bucket(reliability_s3, harness.bucket)
        print(f"\n{harness.size.name} timings: {harness.timings}")
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()
