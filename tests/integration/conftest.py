"""The real stack for integration tests: a migrated PostgreSQL database, a RabbitMQ vhost, an
S3 bucket — plus the runtime, broker and in-process workers built on them.

Each test gets its own queue names and bucket and a database emptied of rows, so tests on the
same services never see each other's work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from actors.broker import make_broker
from actors.inprocess import running_worker
from actors.tasks import Actors, declare_actors
from pipeline.companies import add_company
from pipeline.migrate import upgrade
from pipeline.models import Base, Company
from pipeline.runtime import Runtime
from pipeline.settings import Settings, load_settings, settings_environment
from tests.services import S3Service

FAST_RETRIES = {"retry_min_backoff_ms": 50, "retry_max_backoff_ms": 200}
# The fake upstreams listen on loopback, which the SSRF guard refuses unless allowlisted.
LOOPBACK_UPSTREAMS = {"upstream_allowlist": "127.0.0.0/8"}
TEST_SECRETS_KEY = Fernet.generate_key().decode()


def add_rest_company(rt: Runtime, **kwargs: Any) -> Company:
    """``add_company`` as the API and CLI call it: under the runtime's allowlist and secrets key."""
    return add_company(rt.engine, context=rt.connector_context, secrets=rt.secrets, **kwargs)


@pytest.fixture(scope="session")
def migrated_url(make_database: Callable[[], str]) -> str:
    url = make_database()
    upgrade(url)
    return url


@pytest.fixture
def make_settings(
    migrated_url: str, amqp_url: str, s3_service: S3Service, s3_bucket: str
) -> Callable[..., Settings]:
    """Settings for the real stack, unique queue names per test; keyword overrides win."""
    queue = f"sync-{uuid.uuid4().hex[:8]}"

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": migrated_url, "broker_url": amqp_url, "blob_url": f"s3://{s3_bucket}",
            "s3_endpoint": s3_service.endpoint, "s3_access_key": s3_service.access_key,
            "s3_secret_key": s3_service.secret_key, "s3_secure": s3_service.secure,
            "queue_name": queue, "task_time_budget_s": 30, **FAST_RETRIES, **LOOPBACK_UPSTREAMS,
            "secrets_key": TEST_SECRETS_KEY,
        }
        values.update(overrides)
        return load_settings(**values)

    return make


def _truncate(rt: Runtime) -> None:
    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    with rt.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture
def stack(make_settings: Callable[..., Settings], request: pytest.FixtureRequest) -> Iterator[Runtime]:
    """A runtime on PostgreSQL + S3 with empty tables; ``@pytest.mark.settings(**overrides)`` changes it."""
    marker = request.node.get_closest_marker("settings")
    rt = Runtime.from_settings(make_settings(**(marker.kwargs if marker else {})))
    _truncate(rt)
    try:
        yield rt
    finally:
        _truncate(rt)
        rt.close()


@pytest.fixture
def actors(stack: Runtime) -> Iterator[Actors]:
    """The RabbitMQ broker with our actors declared; its queues are deleted afterwards."""
    broker = make_broker(stack.settings)
    declared = declare_actors(broker, stack)
    try:
        yield declared
    finally:
        for queue in declared.queues:
            _delete_queues(broker, queue)
        broker.close()


def _delete_queues(broker: dramatiq.Broker, queue: str) -> None:
    channel = getattr(broker, "channel", None)
    if channel is None:
        return
    for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
        channel.queue_delete(name)


@pytest.fixture
def worker(actors: Actors) -> Iterator[dramatiq.Worker]:
    """An in-process Dramatiq worker consuming the test's queues."""
    with running_worker(actors.broker, threads=4) as running:
        yield running


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``PIPELINE_*`` environment that reproduces ``settings`` in a subprocess."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIPELINE_")}
    return {**env, **settings_environment(settings)}


@dataclass
class WorkerFleet:
    """``pipeline worker`` processes started as the CLI starts them, each in its own process group."""

    settings: Settings
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, *, processes: int = 1, threads: int = 2) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker", "--processes", str(processes), "--threads",
             str(threads)],
            env=settings_env(self.settings), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.processes.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its children: no chance to ack, checkpoint or clean up."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the main process only, as ``docker stop`` does: Dramatiq forwards it to its worker
        processes, which finish (or checkpoint) what they hold. A worker process that receives a
        second SIGTERM (e.g. one sent to the whole process group) is killed at once instead."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    def stop_all(self) -> None:
        for proc in self.processes:
            self.terminate(proc)
        for proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def worker_fleet(stack: Runtime) -> Iterator[WorkerFleet]:
    fleet = WorkerFleet(stack.settings)
    try:
        yield fleet
    finally:
        fleet.stop_all()
