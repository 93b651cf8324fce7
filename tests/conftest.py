"""Real services for the whole test suite: PostgreSQL, RabbitMQ, S3, and blob stores on them.

With a Docker engine, services run in throwaway containers (testcontainers); without one,
the fixtures use (and if needed start) the PostgreSQL and RabbitMQ installed on this machine,
and a SeaweedFS server of the session's own is the S3 server. Set ``PIPELINE_S3_ENDPOINT`` (plus
``PIPELINE_S3_ACCESS_KEY``, ``PIPELINE_S3_SECRET_KEY``, ``PIPELINE_S3_SECURE``) to test against
another S3 service instead.

moto is not used: it accepts any signature and keeps objects in memory. The session fails if
anything imported it or started it as a process (``pytest_sessionfinish`` below).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, settings

from storage.base import BlobStore
from storage.local import LocalBlobStore
from tests import services
from tests.services import S3Service

pytest_plugins = ["tests.fakes.fixtures"]

# Hypothesis: bounded examples by default (CI); `--hypothesis-profile long` for long runs.
settings.register_profile("ci", max_examples=20, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, stateful_step_count=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """SQLAlchemy URL of a PostgreSQL server where the tests may create databases."""
    if services.docker_available():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer("postgres:15-alpine", driver="psycopg") as container:
            yield container.get_connection_url()
    else:
        yield services.ensure_local_postgres()


@pytest.fixture(scope="session")
def make_database(postgres_admin_url: str) -> Iterator[Callable[[], str]]:
    """Factory: each call creates an empty database ``pipeline_test_<random>`` and returns its URL.

    Every database it created is dropped at the end of the session.
    """
    created: list[str] = []

    def make() -> str:
        name = services.unique_name()
        url = services.create_database(postgres_admin_url, name)
        created.append(name)
        return url

    yield make
    for name in created:
        services.drop_database(postgres_admin_url, name)


@pytest.fixture(scope="session")
def postgres_url(make_database: Callable[[], str]) -> str:
    """One fresh, empty database for the session."""
    return make_database()


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """``amqp://`` URL of a RabbitMQ virtual host used by this session only."""
    vhost = services.unique_name()
    if services.docker_available():
        from testcontainers.community.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-alpine", vhost=vhost) as container:
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/{quote(vhost, safe='')}"
        return
    services.ensure_local_rabbitmq()
    services.add_vhost(vhost)
    host, port = services.LOCAL_AMQP_HOST, services.LOCAL_AMQP_PORT
    try:
        yield f"amqp://guest:guest@{host}:{port}/{quote(vhost, safe='')}"
    finally:
        services.delete_vhost(vhost)


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    """An S3-compatible endpoint: ``PIPELINE_S3_ENDPOINT`` if set, else MinIO in Docker, else a
    SeaweedFS server for this session (free loopback ports, its own data directory)."""
    configured = services.s3_from_environment()
    if configured is not None:
        yield configured
    elif services.docker_available():
        from testcontainers.community.minio import MinioContainer

        with MinioContainer() as container:
            config = container.get_config()
            yield S3Service(config["endpoint"], config["access_key"], config["secret_key"])
    else:
        with services.seaweed(tmp_path_factory.mktemp("seaweedfs")) as server:
            yield services.seaweed_service(server)


@pytest.fixture
def s3_bucket(s3_service: S3Service) -> Iterator[str]:
    """A new, empty bucket for one test; emptied and removed afterwards."""
    bucket = services.unique_name("pipeline-test", separator="-")
    services.create_bucket(s3_service, bucket)
    try:
        yield bucket
    finally:
        services.remove_bucket(s3_service, bucket)


@pytest.fixture(params=["local", "s3"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """Each store implementation in turn, empty: the contract suite runs against both."""
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    service: S3Service = request.getfixturevalue("s3_service")
    return service.store(request.getfixturevalue("s3_bucket"))


_MOTO_STARTS: list[str] = []


def _watch_for_moto(event: str, args: tuple[object, ...]) -> None:
    """Audit hook: remember every subprocess of this session whose command line runs moto."""
    if event == "subprocess.Popen" and re.search(r"\bmoto\b", repr(args[1])):
        _MOTO_STARTS.append(repr(args[1]))


def pytest_configure(config: pytest.Config) -> None:
    sys.addaudithook(_watch_for_moto)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if moto served S3 anywhere in it: in this process or as a subprocess."""
    problems = [f"started as a process: {command}" for command in _MOTO_STARTS]
    if "moto" in sys.modules:
        problems.append("imported in the test process")
    if problems:
        print("\nmoto was used by this test run, but the suite must run on a real S3 server:", *problems,
              sep="\n  ", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
