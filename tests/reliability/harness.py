"""The reliability harness: a real stack, a fleet of ``pipeline worker`` processes, and the knobs
that break one part of it at a time.

Everything here is real: PostgreSQL (a database of its own), RabbitMQ (the session's vhost,
queue names of the test's own), the S3 server (a bucket of its own) reached by the workers
through a TCP proxy the test can cut, and worker processes started exactly as operators start
them. The sweeper runs in a thread of the test process, as the scheduler would run it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from sqlalchemy import func, insert, select

from actors.broker import make_broker
from actors.tasks import Actors, declare_actors
from connectors import registry
from pipeline.models import COMPANIES, JOB_LOG, TASKS, utcnow
from pipeline.planning import PlannedJob, plan_job
from pipeline.progress import JobProgress, job_progress
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from pipeline.sweeper import SweepReport, sweep
from tests.fakes.upstreams import ScheduleApi
from tests.integration.conftest import WorkerFleet, settings_env
from tests.invariants import InvariantReport, check_invariants, delete_queues
from tests.services import S3Service, port_open, wait_for

logger = logging.getLogger(__name__)

# --- sizes ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Size:
    """How big a run is: ``companies`` × (``days_ahead`` schedule days + 1 users list) tasks."""

    name: str
    companies: int
    days_ahead: int = 7
    workers: int = 3
    threads: int = 2
    job_timeout_s: float = 120.0

    @property
    def partitions(self) -> int:
        return self.days_ahead + 1

    @property
    def tasks(self) -> int:
        return self.companies * self.partitions


# The full size, 2,000 tasks per fault (250 companies × 8 partitions), runs under
# `pytest -m soak`; CI runs a reduced size so that the nine faults take under five minutes on
# two cores. RELIABILITY_CI_COMPANIES / RELIABILITY_SOAK_COMPANIES change either.
CI = Size("ci", companies=int(os.environ.get("RELIABILITY_CI_COMPANIES", "50")))
SOAK = Size("soak", companies=int(os.environ.get("RELIABILITY_SOAK_COMPANIES", "250")), job_timeout_s=900.0)
# Every fault test runs at both sizes: ``@pytest.mark.parametrize("size", SIZES)``.
SIZES = [pytest.param(CI, id="ci"), pytest.param(SOAK, id="soak", marks=pytest.mark.soak)]

# Tiny documents: a few records per partition, one chunk each.
TINY = {"jobs_per_day": 3, "employees": 2, "teams": 1, "page_size": 50}


def rest_schedule_config(api: ScheduleApi, *, page_size: int, days_ahead: int) -> dict[str, Any]:
    """The field-service schedule API as a ``rest`` connector config: one page per chunk."""
    envelope = {"success": "IsSuccess", "message": "Message"}
    return {
        "base_url": api.base_url,
        "pages_per_chunk": 1,
        "retry": {"max_attempts": 6, "backoff_s": 0.05, "max_backoff_s": 0.5},
        "resources": {
            "schedule": {
                "path": "/api/dr-schedule",
                "params": {"startDate": "{partition}", "endDate": "{partition}"},
                "partitions": {"type": "daily", "days_ahead": days_ahead},
                "records": "Result", "envelope": envelope, "primary_key": "JobInformationId",
                "paginator": {"type": "page", "size": page_size}, "transform": "schedule",
            },
            "users": {
                "path": "/api/dr-schedule/users", "records": "Result", "envelope": envelope,
                "primary_key": "EmployeeInformationId", "transform": "users",
            },
        },
    }


# --- a TCP proxy the test can cut ---------------------------------------------------------------


class TcpProxy:
    """Forwards ``bind_host:port`` (loopback by default) to ``target``. ``cut()`` closes every open connection and stops
    listening (callers get "connection refused", as from a service that is down); ``restore()``
    listens on the same port again. ``upload_bytes_per_s``, when set, caps what flows from the
    client to the target (a slow link: a fault that makes an upload last at least size / rate)."""

    def __init__(self, target_host: str, target_port: int, *, bind_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.bind_host = bind_host
        self.upload_bytes_per_s: float | None = None
        self.port = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0

    @property
    def endpoint(self) -> str:
        return f"{self.bind_host}:{self.port}"

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.bind_host, self.port))
        listener.listen(256)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="proxy-accept", daemon=True).start()
        return self

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            doomed, self._open = self._open, set()
        for sock in doomed:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self.start()

    def stop(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
                self.connections += 1
            for src, dst, upload in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, upload), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        try:
            while data := src.recv(16384):
                dst.sendall(data)
                rate = self.upload_bytes_per_s if upload else None
                if rate:
                    time.sleep(len(data) / rate)  # the link's bandwidth, not a wait on a condition
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            src.close()


# --- the sweeper, as the scheduler runs it ---------------------------------------------------------


class SweeperThread:
    """Runs ``pipeline.sweeper.sweep`` every ``interval_s`` until stopped; survives outages."""

    def __init__(self, rt: Runtime, dispatcher: Actors, *, pending_grace_s: float, interval_s: float = 0.5) -> None:
        self.rt = rt
        self.dispatcher = dispatcher
        self.pending_grace_s = pending_grace_s
        self.interval_s = interval_s
        self.reports: list[SweepReport] = []
        self.errors: list[str] = []
        self.enabled = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweeper", daemon=True)

    @property
    def resent(self) -> int:
        return sum(report.expired_leases + report.lost_messages for report in self.reports)

    def start(self) -> SweeperThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.enabled:
                continue
            try:
                report = sweep(self.rt.engine, self.dispatcher, pending_grace_s=self.pending_grace_s)
            except Exception as exc:  # the database or the broker is down: try again next round
                self.errors.append(f"{type(exc).__name__}: {exc}")
                # Dramatiq keeps one connection per thread; drop a dead one so the next round reconnects.
                with suppress(Exception):
                    del self.dispatcher.broker.connection  # type: ignore[attr-defined]
                continue
            if report.expired_leases or report.lost_messages:
                self.reports.append(report)


# --- the worker fleet ---------------------------------------------------------------------------


@dataclass
class Fleet(WorkerFleet):
    """``pipeline worker`` processes (one Dramatiq process each), with their output kept in files."""

    log_dir: Path = Path(".")
    started: int = 0

    def start(self, *, processes: int = 1, threads: int = 2) -> subprocess.Popen[bytes]:
        self.started += 1
        log = (self.log_dir / f"worker-{self.started}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker", "--processes", str(processes), "--threads",
             str(threads)],
            env=settings_env(self.settings), start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes.append(proc)
        return proc

    @property
    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [proc for proc in self.processes if proc.poll() is None]

    def logs(self) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("worker-*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} (last 3000 chars) ---\n{text[-3000:]}")
        return "\n".join(parts)


# --- service control ----------------------------------------------------------------------------


def _run(*command: str, timeout: float = 120.0) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr or result.stdout}")


def postgres_cluster() -> tuple[str, str]:
    versions = sorted(Path("/etc/postgresql").iterdir(), key=lambda path: int(path.name))
    return versions[-1].name, "main"


def stop_postgres() -> None:
    version, cluster = postgres_cluster()
    _run("pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "stop", "--mode", "fast")


def start_postgres(answers: Callable[[], bool]) -> None:
    version, cluster = postgres_cluster()
    _run("pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "start")
    wait_for(answers, timeout=60, what="PostgreSQL to accept connections again", interval=0.2)


def stop_rabbitmq() -> None:
    _run("rabbitmqctl", "stop_app")


def start_rabbitmq(host: str = "127.0.0.1", port: int = 5672) -> None:
    _run("rabbitmqctl", "start_app")
    _run("rabbitmqctl", "--timeout", "60", "await_startup", timeout=90)
    wait_for(lambda: port_open(host, port), timeout=60, what="RabbitMQ to accept connections again")


# --- the harness ----------------------------------------------------------------------------------


@dataclass
class Harness:
    """One test's stack. ``worker_settings`` is what the worker processes see (S3 through the
    proxy); ``rt`` is the test's own runtime (S3 directly), used to plan, sweep and check."""

    size: Size
    worker_settings: Settings
    rt: Runtime
    actors: Actors
    fleet: Fleet
    proxy: TcpProxy
    s3: S3Service
    bucket: str
    amqp_url: str
    sweeper: SweeperThread | None = None
    timings: dict[str, float] = field(default_factory=dict)
    configs: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def engine(self) -> Any:
        return self.rt.engine

    @property
    def queues(self) -> list[str]:
        return self.actors.queues

    # -- setup -----------------------------------------------------------------------------

    def add_companies(self, count: int, config: Mapping[str, Any], *, connector: str = "synthetic",
                      name: str = "company", expect: Mapping[str, int] | None = None) -> list[int]:
        """Insert ``count`` companies sharing one (validated) connector config, in one statement.

        ``expect`` gives ``jobs_per_day`` and ``employees`` of a non-synthetic upstream, for
        ``expected_records``.
        """
        registry.validate(connector, config, context=self.rt.connector_context)
        now = utcnow()
        tag = uuid.uuid4().hex[:6]
        rows = [
            {"name": f"{name} {index}", "external_id": f"{name}-{tag}-{index}", "sync_enabled": True,
             "connector": connector, "connector_config": dict(config), "feature_toggles": {},
             "created_at": now, "updated_at": now}
            for index in range(count)
        ]
        with self.engine.begin() as conn:
            ids = list(conn.execute(insert(COMPANIES).returning(COMPANIES.c.id), rows).scalars())
        self.configs.update((company_id, dict(expect or config)) for company_id in ids)
        return ids

    def start_workers(self, count: int | None = None, *, wait: bool = True) -> list[subprocess.Popen[bytes]]:
        count = self.size.workers if count is None else count
        before = self.consumers()
        started = [self.fleet.start(threads=self.size.threads) for _ in range(count)]
        if wait:
            wait_for(lambda: self.consumers() >= before + count, timeout=60,
                     what=f"{count} worker(s) to consume {self.queues[0]}", interval=0.2)
        return started

    def consumers(self) -> int:
        """Consumers on the normal-priority queue: one per live worker process."""
        with _channel(self.amqp_url) as channel:
            try:
                declared = channel.queue_declare(self.queues[0], passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                return 0
            return int(declared.method.consumer_count)

    def start_sweeper(self, *, interval_s: float = 0.5) -> SweeperThread:
        self.sweeper = SweeperThread(self.rt, self.actors, pending_grace_s=self.rt.settings.pending_grace_s,
                                     interval_s=interval_s).start()
        return self.sweeper

    def plan(self, **kwargs: Any) -> PlannedJob:
        started = time.monotonic()
        dispatcher = kwargs.pop("dispatcher", self.actors)
        planned = plan_job(self.engine, dispatcher, trigger=kwargs.pop("trigger", "cli"), **kwargs)
        assert planned is not None
        self.timings["plan_s"] = round(time.monotonic() - started, 2)
        return planned

    # -- observing -------------------------------------------------------------------------

    def progress(self, job_id: uuid.UUID) -> JobProgress:
        return job_progress(self.engine, job_id)

    def wait_for_done(self, job_id: uuid.UUID, at_least: int, *, timeout: float = 120.0) -> JobProgress:
        """Wait until ``at_least`` of the job's tasks are finished (to inject a fault mid-run)."""
        result: list[JobProgress] = []

        def reached() -> bool:
            result[:] = [self.progress(job_id)]
            return result[0].done_tasks >= at_least

        wait_for(reached, timeout=timeout, what=f"{at_least} finished tasks", interval=0.1)
        return result[0]

    def wait_for_job(self, job_id: uuid.UUID, *, timeout: float | None = None) -> JobProgress:
        timeout = timeout or self.size.job_timeout_s
        started = time.monotonic()
        last: list[JobProgress] = []

        def finished() -> bool:
            try:
                last[:] = [self.progress(job_id)]
            except Exception:  # the database may be restarting
                return False
            return last[0].finished

        try:
            wait_for(finished, timeout=timeout, what=f"job {job_id} to finish", interval=0.25)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; last progress {last[0] if last else None}; "
                                 f"tasks by status {self.task_states(job_id)}\n{self.fleet.logs()}") from None
        self.timings["wait_s"] = round(time.monotonic() - started, 2)
        return last[0]

    def task_states(self, job_id: uuid.UUID) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(TASKS.c.status, func.count()).where(TASKS.c.job_id == job_id).group_by(TASKS.c.status)
            ).all()
        return {row[0]: row[1] for row in rows}

    def job_log(self, job_id: uuid.UUID) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(JOB_LOG).where(JOB_LOG.c.job_id == job_id).order_by(JOB_LOG.c.id)))

    # -- finishing -------------------------------------------------------------------------

    def wait_for_queues_drained(self, *, timeout: float = 60.0) -> None:
        """Every message handled: nothing ready, delayed or held unacknowledged by a worker.

        Dead-lettered messages (.XQ) never drain; ``check_queues_empty`` reports them.
        """

        def drained() -> bool:
            totals = _queue_totals(self.amqp_url, self.queues)
            return not any(count for name, count in totals.items() if not name.endswith(".XQ"))

        wait_for(drained, timeout=timeout, what="the queues to drain", interval=0.5)

    def finish(
        self,
        *job_ids: uuid.UUID,
        expected_failed: Callable[[Any], bool] = lambda task: False,
        expected_records: Callable[[Any], int] | None = None,
    ) -> list[InvariantReport]:
        """Wait for the jobs and the queues, stop the fleet and the sweeper, then check every invariant."""
        for job_id in job_ids:
            self.wait_for_job(job_id)
        self.wait_for_queues_drained()
        if self.sweeper is not None:
            self.sweeper.stop()
        started = time.monotonic()
        self.fleet.stop_all()
        self.timings["stop_s"] = round(time.monotonic() - started, 2)
        started = time.monotonic()
        reports = [
            check_invariants(
                self.engine, job_id, client=self.s3.client(), bucket=self.bucket, store=self.rt.store,
                amqp_url=self.amqp_url, queues=self.queues, expected_failed=expected_failed,
                expected_records=expected_records or self.expected_records,
            )
            for job_id in job_ids
        ]
        self.timings["check_s"] = round(time.monotonic() - started, 2)
        logger.info("%s; timings %s", reports, self.timings)
        return reports

    def expected_records(self, task: Any) -> int:
        """What a complete document of ``task`` holds, from its company's synthetic config."""
        config = self.configs[task.company_id]
        if task.resource == "schedule":
            return int(config.get("jobs_per_day", 50))
        return int(config.get("employees", 20))


@contextmanager
def _channel(amqp_url: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        yield connection.channel()
    finally:
        with suppress(Exception):
            connection.close()


def _queue_totals(amqp_url: str, queues: Sequence[str]) -> dict[str, int]:
    """Ready plus unacknowledged messages per queue, as RabbitMQ counts them (``rabbitmqctl``)."""
    vhost = pika.URLParameters(amqp_url).virtual_host
    result = subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name", "messages"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    wanted = {name for queue in queues for name in (queue, f"{queue}.DQ", f"{queue}.XQ")}
    totals: dict[str, int] = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in wanted:
            totals[parts[0]] = int(parts[1])
    return totals


def build_harness(
    size: Size, *, database_url: str, amqp_url: str, s3: S3Service, bucket: str, log_dir: Path,
    **overrides: Any,
) -> Harness:
    """Settings, proxy, runtime and broker for one test; ``overrides`` go into the settings."""
    from pipeline.settings import load_settings

    host, _, port = s3.endpoint.rpartition(":")
    proxy = TcpProxy(host, int(port)).start()
    values: dict[str, Any] = {
        "database_url": database_url, "broker_url": amqp_url, "blob_url": f"s3://{bucket}",
        "s3_endpoint": proxy.endpoint, "s3_access_key": s3.access_key, "s3_secret_key": s3.secret_key,
        "s3_secure": s3.secure, "queue_name": f"rel-{uuid.uuid4().hex[:8]}",
        # Short leases and grace so that a lost worker or message is noticed within seconds.
        "lease_s": 4.0, "pending_grace_s": 3.0, "task_time_budget_s": 10.0,
        "retry_min_backoff_ms": 200, "retry_max_backoff_ms": 2_000,
        "worker_threads": size.threads, "log_level": "WARNING",
        "upstream_allowlist": "127.0.0.0/8",  # the fake upstreams and the fault proxies are on loopback
    }
    values.update(overrides)
    worker_settings = load_settings(**values)
    direct = worker_settings.model_copy(update={"s3_endpoint": s3.endpoint})
    rt = Runtime.from_settings(direct)
    broker = make_broker(direct)
    actors = declare_actors(broker, rt)
    assert isinstance(broker, RabbitmqBroker)
    for queue in actors.queues:
        broker.get_queue_message_counts(queue)  # declares the queue with its .DQ and .XQ
    fleet = Fleet(worker_settings, log_dir=log_dir)
    return Harness(size=size, worker_settings=worker_settings, rt=rt, actors=actors, fleet=fleet, proxy=proxy,
                   s3=s3, bucket=bucket, amqp_url=amqp_url)


def teardown_harness(harness: Harness) -> None:
    if harness.sweeper is not None:
        harness.sweeper.stop()
    try:
        harness.fleet.stop_all()
    finally:
        # Whatever happened above, no worker of this test outlives it.
        for proc in harness.fleet.processes:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    harness.proxy.stop()
    with suppress(Exception):
        delete_queues(harness.amqp_url, harness.queues)
    with suppress(Exception):
        harness.actors.broker.close()
    harness.rt.close()
