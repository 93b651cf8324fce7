"""Helpers behind the service fixtures in ``tests/conftest.py``: real PostgreSQL, RabbitMQ and S3.

PostgreSQL and RabbitMQ come from a Docker container when a Docker engine answers, otherwise
from the services this machine runs (started on demand). S3 is ``PIPELINE_S3_ENDPOINT`` when set,
MinIO in Docker when an engine answers, else a SeaweedFS server of the run's own
(``storage.seaweed``). Nothing here sleeps blindly: waits poll a condition until a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from minio import Minio
from minio.deleteobjects import DeleteObject
from psycopg import sql
from sqlalchemy.engine import make_url

from storage.s3 import S3BlobStore
from storage.seaweed import SeaweedFS

LOCAL_POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOCAL_AMQP_HOST = "127.0.0.1"
LOCAL_AMQP_PORT = 5672


@dataclass(frozen=True, slots=True)
class S3Service:
    """Where the test S3 service listens; ``endpoint`` is ``host:port``."""

    endpoint: str
    access_key: str
    secret_key: str
    secure: bool = False

    def client(self) -> Minio:
        """A raw SDK client, for setting up and inspecting buckets behind the store's back."""
        return Minio(
            self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=self.secure
        )

    def store(self, bucket: str, *, prefix: str = "") -> S3BlobStore:
        return S3BlobStore(
            endpoint=self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=self.secure,
            bucket=bucket,
            prefix=prefix,
        )


def unique_name(prefix: str = "pipeline_test", separator: str = "_") -> str:
    """A name no other test run uses, e.g. ``pipeline_test_3f9c2a1b7d4e``."""
    return f"{prefix}{separator}{uuid.uuid4().hex[:12]}"


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``condition`` until it returns true; fail naming ``what`` once ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@functools.cache
def docker_available(timeout: float = 2.0) -> bool:
    """True when a Docker engine answers a ping within ``timeout`` seconds."""
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _run(*command: str, timeout: float = 120.0) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.CalledProcessError as exc:
        output = (exc.stderr or exc.stdout or "").strip()
        raise RuntimeError(f"{' '.join(command)} failed with exit code {exc.returncode}: {output}") from exc


# --- PostgreSQL ---------------------------------------------------------------------------------


def _conninfo(url: str) -> str:
    """libpq form of a SQLAlchemy URL (drops the ``+psycopg`` driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(_conninfo(url), connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def ensure_local_postgres(admin_url: str = LOCAL_POSTGRES_ADMIN_URL, *, timeout: float = 60.0) -> str:
    """Return ``admin_url`` once the local server answers, starting the Debian cluster if it is down."""
    if postgres_answers(admin_url):
        return admin_url
    versions = sorted(Path("/etc/postgresql").iterdir(), key=lambda path: int(path.name))
    if not versions or not shutil.which("pg_ctlcluster"):
        raise RuntimeError(f"PostgreSQL at {admin_url} is down and no local cluster is installed")
    _run("pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].name, "main", "start")
    wait_for(lambda: postgres_answers(admin_url), timeout=timeout, what=f"PostgreSQL at {admin_url}")
    return admin_url


def create_database(admin_url: str, name: str) -> str:
    """Create the empty database ``name`` on the server of ``admin_url``; return its URL."""
    with psycopg.connect(_conninfo(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    """Drop ``name`` even while connections from the tests are still open."""
    with psycopg.connect(_conninfo(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# --- RabbitMQ -----------------------------------------------------------------------------------


def ensure_local_rabbitmq(*, timeout: float = 90.0) -> None:
    """Return once the local broker accepts AMQP connections, starting it if it is down."""
    if port_open(LOCAL_AMQP_HOST, LOCAL_AMQP_PORT):
        return
    _run("rabbitmq-server", "-detached")
    _run("rabbitmqctl", "--timeout", str(int(timeout)), "await_startup", timeout=timeout + 10)
    wait_for(
        lambda: port_open(LOCAL_AMQP_HOST, LOCAL_AMQP_PORT),
        timeout=timeout,
        what=f"RabbitMQ on {LOCAL_AMQP_HOST}:{LOCAL_AMQP_PORT}",
    )


def add_vhost(vhost: str, user: str = "guest") -> None:
    """Create ``vhost`` on the local broker and give ``user`` full rights on it."""
    _run("rabbitmqctl", "add_vhost", vhost)
    _run("rabbitmqctl", "set_permissions", "-p", vhost, user, ".*", ".*", ".*")


def delete_vhost(vhost: str) -> None:
    """Delete ``vhost`` (and every queue in it) from the local broker."""
    _run("rabbitmqctl", "delete_vhost", vhost)


# --- S3 -----------------------------------------------------------------------------------------


def s3_from_environment() -> S3Service | None:
    """The S3 service ``PIPELINE_S3_ENDPOINT`` (with ``PIPELINE_S3_ACCESS_KEY`` / ``_SECRET_KEY`` /
    ``_SECURE``) names, or ``None`` when it is not set."""
    endpoint = os.environ.get("PIPELINE_S3_ENDPOINT")
    if not endpoint:
        return None
    return S3Service(
        endpoint=endpoint,
        access_key=os.environ.get("PIPELINE_S3_ACCESS_KEY", "minioadmin"),
        secret_key=os.environ.get("PIPELINE_S3_SECRET_KEY", "minioadmin"),
        secure=os.environ.get("PIPELINE_S3_SECURE", "").lower() in {"1", "true", "yes", "on"},
    )


def seaweed_service(server: SeaweedFS) -> S3Service:
    return S3Service(server.endpoint, server.access_key, server.secret_key)


@contextlib.contextmanager
def seaweed(data_dir: Path) -> Iterator[SeaweedFS]:
    """A started SeaweedFS server on ``data_dir`` with fresh credentials; stopped and its data
    directory removed afterwards."""
    server = SeaweedFS(data_dir, access_key=f"test-{secrets.token_hex(4)}", secret_key=secrets.token_urlsafe(24))
    try:
        yield server.start()
    finally:
        server.remove()


def create_bucket(service: S3Service, bucket: str) -> None:
    service.client().make_bucket(bucket)


def remove_bucket(service: S3Service, bucket: str) -> None:
    """Delete every object in ``bucket``, then the bucket; a missing bucket is fine."""
    client = service.client()
    if not client.bucket_exists(bucket):
        return
    doomed = [DeleteObject(found.object_name) for found in client.list_objects(bucket, recursive=True)]
    for error in client.remove_objects(bucket, doomed):
        raise RuntimeError(f"could not empty test bucket {bucket!r}: {error}")
    client.remove_bucket(bucket)
