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
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minio import Minio
from minio.deleteobjects import DeleteObject

# The local PostgreSQL and RabbitMQ are found, started and provisioned as ``scripts/stack`` does.
from pipeline.stack import (
    LOCAL_AMQP_HOST,
    LOCAL_AMQP_PORT,
    LOCAL_POSTGRES_ADMIN_URL,
    add_vhost,
    create_database,
    delete_vhost,
    drop_database,
    ensure_local_postgres,
    ensure_local_rabbitmq,
    port_open,
    postgres_answers,
    wait_for,
)
from storage.s3 import S3BlobStore
from storage.seaweed import SeaweedFS


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


__all__ = [
    "LOCAL_AMQP_HOST", "LOCAL_AMQP_PORT", "LOCAL_POSTGRES_ADMIN_URL", "S3Service", "add_vhost", "create_bucket",
    "create_database", "delete_vhost", "docker_available", "drop_database", "ensure_local_postgres",
    "ensure_local_rabbitmq", "free_port", "port_open", "postgres_answers", "remove_bucket", "s3_from_environment",
    "seaweed", "seaweed_service", "unique_name", "wait_for",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


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
