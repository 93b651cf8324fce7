"""Isolated services for one benchmark: a fresh PostgreSQL database, a RabbitMQ vhost, an S3
bucket (on its own SeaweedFS server unless ``PIPELINE_S3_ENDPOINT`` names another) and a blob
directory — all removed afterwards, on failure and on Ctrl-C / SIGTERM too.

The service helpers themselves are the test suite's (``tests.services``): the benchmarks
provision exactly what the integration tests provision, with names of their own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import quote

import pika
import pika.exceptions
import psycopg
from sqlalchemy import insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from pipeline.migrate import upgrade
from pipeline.models import COMPANIES, utcnow
from pipeline.runtime import Runtime
from pipeline.settings import Settings, load_settings, settings_environment
from tests import services
from tests.services import S3Service

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# What a poll may meet while the reliability suite restarts the shared PostgreSQL or RabbitMQ.
SERVICE_BLIPS: tuple[type[Exception], ...] = (OperationalError, psycopg.OperationalError,
                                              pika.exceptions.AMQPConnectionError)


# --- interrupts ----------------------------------------------------------------------------------


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def interrupts_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind the stack like Ctrl-C does, so every ``finally`` cleans up."""
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore Ctrl-C while cleaning up: a second interrupt must not leave services behind."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def cleanup_stack() -> Iterator[contextlib.ExitStack]:
    """An ExitStack whose callbacks run shielded from Ctrl-C, in reverse order, even on failure."""
    resources = contextlib.ExitStack()
    try:
        with interrupts_unwind():
            yield resources
    finally:
        with shielded():
            resources.close()


# --- services ------------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"bench_{prefix}_{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def postgres_database(prefix: str, *, migrate: bool = True) -> Iterator[str]:
    """A fresh database on ``PIPELINE_BENCH_POSTGRES_URL`` (migrated to head), dropped afterwards."""
    admin = os.environ.get("PIPELINE_BENCH_POSTGRES_URL", DEFAULT_ADMIN_URL)
    admin = services.ensure_local_postgres(admin) if "127.0.0.1" in admin or "localhost" in admin else admin
    name = unique(prefix)
    url = services.create_database(admin, name)
    try:
        if migrate:
            upgrade(url)
        yield url
    finally:
        _retrying(lambda: services.drop_database(admin, name), (psycopg.OperationalError,),
                  lambda: services.postgres_answers(admin))


@contextlib.contextmanager
def rabbitmq_vhost(prefix: str) -> Iterator[str]:
    """A vhost of its own on the local RabbitMQ (``guest`` has every right on it), deleted afterwards."""
    services.ensure_local_rabbitmq()
    vhost = unique(prefix)
    _retrying(lambda: services.add_vhost(vhost), (RuntimeError,), _broker_answers)
    try:
        yield f"amqp://guest:guest@{services.LOCAL_AMQP_HOST}:{services.LOCAL_AMQP_PORT}/{quote(vhost, safe='')}"
    finally:
        _retrying(lambda: services.delete_vhost(vhost), (RuntimeError,), _broker_answers)


def _broker_answers() -> bool:
    done = subprocess.run(["rabbitmqctl", "--timeout", "10", "await_startup"], capture_output=True, timeout=30)
    return done.returncode == 0


def _retrying(action: Callable[[], None], errors: tuple[type[Exception], ...], service_up: Callable[[], bool],
              *, timeout: float = 180) -> None:
    """Run a setup or cleanup action, waiting out a restart of the service: the reliability
    suite stops and starts the machine's PostgreSQL and RabbitMQ while other runs use them."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            action()
            return
        except errors:
            if time.monotonic() >= deadline:
                raise
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if service_up():
                    break
            time.sleep(1)


@contextlib.contextmanager
def s3_endpoint(work: Path) -> Iterator[tuple[S3Service, int | None]]:
    """``PIPELINE_S3_ENDPOINT`` (a real S3 service) if set, else a SeaweedFS server of the run's
    own under ``work`` (its pid comes along, for CPU accounting)."""
    configured = services.s3_from_environment()
    if configured is not None:
        yield configured, None
        return
    with services.seaweed(work / "seaweedfs") as server:
        yield services.seaweed_service(server), server.pid


@contextlib.contextmanager
def s3_bucket(service: S3Service) -> Iterator[str]:
    bucket = unique("s3").replace("_", "-")
    services.create_bucket(service, bucket)
    try:
        yield bucket
    finally:
        services.remove_bucket(service, bucket)


def stop_process_group(process: subprocess.Popen[bytes], *, grace_s: float) -> None:
    """SIGTERM the leader of the process group ``process`` leads, SIGKILL the group after ``grace_s``.

    Only the leader gets the SIGTERM, as ``docker stop`` does: the Dramatiq CLI forwards it to
    its workers, which finish their messages; a second SIGTERM would kill them at once.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Children may outlive a leader that exited: the group is killed either way.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@dataclass
class Stack:
    """The services of one benchmark run; ``settings()`` builds the pipeline's settings on them."""

    name: str
    work: Path
    database_url: str
    amqp_url: str | None = None
    s3: S3Service | None = None
    bucket: str | None = None
    s3_pid: int | None = None
    cleanups: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def database_name(self) -> str:
        name = make_url(self.database_url).database
        assert name is not None
        return name

    @property
    def blob_dir(self) -> Path:
        return self.work / "blobs"

    def settings(self, *, blob: str = "s3", **overrides: Any) -> Settings:
        """Settings on this stack; ``blob`` is "s3" (the bucket) or "local" (a directory)."""
        values: dict[str, Any] = {"database_url": self.database_url, "broker_url": self.amqp_url,
                                  "queue_name": "sync", "log_level": "WARNING"}
        if blob == "s3":
            if self.s3 is None or self.bucket is None:
                raise RuntimeError("this stack has no S3 bucket")
            values.update(blob_url=f"s3://{self.bucket}", s3_endpoint=self.s3.endpoint,
                          s3_access_key=self.s3.access_key, s3_secret_key=self.s3.secret_key,
                          s3_secure=self.s3.secure)
        else:
            values["blob_url"] = self.blob_dir.as_uri()
        values.update(overrides)
        return load_settings(**values)

    def admin_sql(self, statement: str) -> list[tuple[Any, ...]]:
        """Run one statement on the bench database (autocommit) and return its rows."""
        with psycopg.connect(database_dsn(self.database_url), autocommit=True) as conn:
            cursor = conn.execute(statement.encode())
            return cursor.fetchall() if cursor.description is not None else []


@contextlib.contextmanager
def stack(name: str, *, broker: bool = True, s3: bool = True) -> Iterator[Stack]:
    """Provision the services a benchmark needs and remove them afterwards, whatever happens."""
    with cleanup_stack() as resources:
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        resources.callback(shutil.rmtree, work, ignore_errors=True)
        database_url = resources.enter_context(postgres_database(name))
        amqp_url = resources.enter_context(rabbitmq_vhost(name)) if broker else None
        service, s3_pid = resources.enter_context(s3_endpoint(work)) if s3 else (None, None)
        bucket = resources.enter_context(s3_bucket(service)) if service is not None else None
        built = Stack(name=name, work=work, database_url=database_url, amqp_url=amqp_url, s3=service,
                      bucket=bucket, s3_pid=s3_pid)
        # Whatever the benchmark starts (workers, brokers) is stopped before the services go.
        resources.enter_context(built.cleanups)
        yield built


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that reproduces ``settings`` in a ``pipeline`` subprocess."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIPELINE_")}
    env.update(settings_environment(settings))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def database_dsn(url: str) -> str:
    """libpq form of a SQLAlchemy URL, for raw psycopg connections."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# --- RabbitMQ probes -----------------------------------------------------------------------------


@contextlib.contextmanager
def amqp_channel(amqp_url: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        yield connection.channel()
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()


def queue_counts(channel: Any, queue: str) -> tuple[int, int] | None:
    """(messages ready, consumers) of ``queue``, or ``None`` when it does not exist yet."""
    try:
        frame = channel.queue_declare(queue=queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        return None
    return frame.method.message_count, frame.method.consumer_count


T = TypeVar("T")


def retrying_blips(action: Callable[[], T], *, what: str, attempts: int = 3) -> T:
    """Run ``action`` again (up to ``attempts`` times) when a shared service restarts under it.

    The reliability suite stops and starts this machine's PostgreSQL and RabbitMQ while other
    runs use them; a measurement cut by such a restart is thrown away, not reported.
    """
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except SERVICE_BLIPS as exc:
            if attempt == attempts:
                raise
            print(f"  ({what}: a service went away under the run — {type(exc).__name__}; running it again)",
                  flush=True)
            time.sleep(5)
    raise AssertionError("unreachable")


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05,
               tolerate: tuple[type[Exception], ...] = ()) -> float:
    """Poll ``condition`` until it holds; return when it did (``time.perf_counter``).

    ``tolerate``: errors that count as "not yet" (a service restarting under the poll).
    """
    deadline = time.perf_counter() + timeout
    while True:
        try:
            if condition():
                return time.perf_counter()
        except tolerate:
            pass
        if time.perf_counter() >= deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class _QueueProbe:
    """Reads (ready, consumers) of one queue; a passive declare of a missing queue closes the
    channel, so a new one is opened for the next read."""

    def __init__(self, connection: pika.BlockingConnection, queue: str) -> None:
        self.connection = connection
        self.queue = queue
        self.channel = connection.channel()

    def counts(self) -> tuple[int, int] | None:
        if not self.channel.is_open:
            self.channel = self.connection.channel()
        return queue_counts(self.channel, self.queue)


def _poll_queue(amqp_url: str, queue: str, reached: Callable[[tuple[int, int]], bool], *, timeout: float,
                what: str, interval: float) -> float:
    """Poll (ready, consumers) of ``queue`` until ``reached``; rides out a broker restart."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            with amqp_channel(amqp_url) as channel:
                probe = _QueueProbe(channel.connection, queue)

                def check(probe: _QueueProbe = probe) -> bool:
                    counts = probe.counts()
                    return counts is not None and reached(counts)

                return wait_until(check, timeout=max(deadline - time.perf_counter(), 0.0), what=what,
                                  interval=interval)
        except pika.exceptions.AMQPConnectionError:
            if time.perf_counter() >= deadline:
                raise
            time.sleep(1)


def wait_for_depth(amqp_url: str, queue: str, depth: int, *, timeout: float) -> float:
    """Poll ``queue``'s ready count (passive queue_declare) until it reaches ``depth``."""
    return _poll_queue(amqp_url, queue, lambda counts: counts[0] >= depth, timeout=timeout,
                       what=f"{depth} messages on {queue!r}", interval=0.01)


def wait_for_consumers(amqp_url: str, queue: str, consumers: int, *, timeout: float = 120) -> None:
    _poll_queue(amqp_url, queue, lambda counts: counts[1] >= consumers, timeout=timeout,
                what=f"{consumers} consumer(s) on {queue!r}", interval=0.2)


def add_synthetic_companies(rt: Runtime, count: int, config: dict[str, Any]) -> None:
    """``count`` synthetic companies sharing ``config``, inserted in one statement."""
    now = utcnow()
    with rt.engine.begin() as conn:
        conn.execute(insert(COMPANIES), [
            {"name": f"Company {index}", "external_id": f"ext-{index}", "sync_enabled": True,
             "connector": "synthetic", "connector_config": config, "feature_toggles": {},
             "created_at": now, "updated_at": now}
            for index in range(count)
        ])
