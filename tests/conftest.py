"""Real services for the whole test suite: PostgreSQL, RabbitMQ, S3, and blob stores on them.

With a Docker engine, services run in throwaway containers (testcontainers); without one,
the fixtures use (and if needed start) the services installed on this machine, and moto
stands in for MinIO. Set ``PIPELINE_S3_ENDPOINT`` (plus ``PIPELINE_S3_ACCESS_KEY``,
``PIPELINE_S3_SECRET_KEY``, ``PIPELINE_S3_SECURE``) to test against a real MinIO instead.
"""

from __future__ import annotations

import os
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
def s3_service() -> Iterator[S3Service]:
    """An S3-compatible endpoint: ``PIPELINE_S3_ENDPOINT`` if set, else MinIO in Docker, else moto."""
    endpoint = os.environ.get("PIPELINE_S3_ENDPOINT")
    if endpoint:
        yield S3Service(
            endpoint=endpoint,
            access_key=os.environ.get("PIPELINE_S3_ACCESS_KEY", "minioadmin"),
            secret_key=os.environ.get("PIPELINE_S3_SECRET_KEY", "minioadmin"),
            secure=os.environ.get("PIPELINE_S3_SECURE", "").lower() in {"1", "true", "yes", "on"},
        )
    elif services.docker_available():
        from testcontainers.community.minio import MinioContainer

        with MinioContainer() as container:
            config = container.get_config()
            yield S3Service(config["endpoint"], config["access_key"], config["secret_key"])
    else:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield S3Service(f"{host}:{port}", "testing", "testing")
        finally:
            server.stop()


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


def pytest_configure(config: pytest.Config) -> None:
    # moto's werkzeug server logs every request; keep test output readable.
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
