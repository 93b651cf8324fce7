"""End-to-end throughput benchmark: ``python -m bench throughput [--quick]``.

2,000 small partitions (``--quick``: 200) — 250 synthetic companies × 8 schedule days of 50
jobs each — through ``pipeline worker`` subprocesses on PostgreSQL + RabbitMQ + S3 (a SeaweedFS
server of its own, or ``PIPELINE_S3_ENDPOINT``), in tasks/s from planning to the job's
``completed_at``. Then the same sync again: the data is unchanged, so nothing is uploaded.

Baseline, on the same services with the same process and thread counts: a minimal
hand-written Dramatiq actor (``bench._baseline_worker``, run by the ``dramatiq`` CLI) doing the
same fetch, render, upload and one upsert per partition. Both produce byte-identical
documents; the benchmark checks the checksums match.

The three passes (baseline, first sync, unchanged sync) run interleaved, ``--repeat`` rounds
(3; ``--quick``: 1), and the best of each counts: on a shared 2-core machine the load of other
work moves single runs by a factor of two. Besides tasks/s it prints CPU per task of the
workers and the services (less sensitive to that load) and the round trips per task.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import psutil
import psycopg
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from sqlalchemy import insert, select, text

from actors.broker import make_broker
from actors.tasks import declare_actors
from bench import _baseline_worker as baseline
from bench._cpu import CpuWindow, matching, tree
from bench._fleet import Fleet, dramatiq_command, fleet, pipeline_worker_command
from bench._profile import recording, summarize
from bench._report import Row, at_least, at_most, load_line, print_table, row
from bench._stack import (
    Stack,
    add_synthetic_companies,
    database_dsn,
    retrying_blips,
    settings_env,
    stack,
    wait_for_consumers,
    wait_until,
)
from bench._trips import Trips, probe
from pipeline.execution import run_task
from pipeline.models import COMPANIES, DATASETS, JOBS, utcnow
from pipeline.planning import plan_job
from pipeline.runtime import Runtime

JOBS_PER_PARTITION = 50
DAYS = 8
WARM_UP_TASKS = 16


@dataclass(frozen=True)
class Pass:
    seconds: float
    tasks: int

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds


def add_companies(rt: Runtime, count: int) -> int:
    """``count`` companies of 8 schedule days, plus a warm-up company; returns the warm-up one's id."""
    config = {"jobs_per_day": JOBS_PER_PARTITION, "days_ahead": DAYS}
    add_synthetic_companies(rt, count, config)
    now = utcnow()
    with rt.engine.begin() as conn:
        warm: int = conn.execute(insert(COMPANIES).values(
            name="Warm-up", external_id="warm-up", sync_enabled=True, connector="synthetic",
            connector_config={"jobs_per_day": JOBS_PER_PARTITION, "days_ahead": WARM_UP_TASKS},
            feature_toggles={}, created_at=now, updated_at=now,
        ).returning(COMPANIES.c.id)).scalar_one()
    return warm


def partitions(days: int) -> list[str]:
    today = utcnow().date()
    return [today.fromordinal(today.toordinal() + day).isoformat() for day in range(days)]


def run_ours(rt: Runtime, tasks: int, *, company_ids: list[int] | None = None) -> Pass:
    broker = make_broker(rt.settings)
    try:
        actors = declare_actors(broker, rt)
        started = datetime.now(UTC)
        planned = plan_job(rt.engine, actors, trigger="schedule", resources=["schedule"], company_ids=company_ids)
    finally:
        broker.close()
    assert planned is not None and planned.total_tasks == tasks, planned

    def finished() -> bool:
        with rt.engine.connect() as conn:
            status = conn.execute(select(JOBS.c.status).where(JOBS.c.id == planned.job_id)).scalar_one()
        return status in {"completed", "failed", "cancelled"}

    wait_until(finished, timeout=3600, what=f"job {planned.job_id}", interval=0.2)
    with rt.engine.connect() as conn:
        job = conn.execute(select(JOBS).where(JOBS.c.id == planned.job_id)).one()
    if job.status != "completed" or job.completed_tasks != tasks:
        raise RuntimeError(f"job {job.id} ended {job.status}: {job.completed_tasks} completed, "
                           f"{job.failed_tasks} failed ({job.error_message})")
    return Pass((job.completed_at - started).total_seconds(), tasks)


def run_baseline(st: Stack, company_ids: list[int], days: int, version: int = 0) -> Pass:
    assert st.amqp_url is not None
    tasks = len(company_ids) * days
    broker = RabbitmqBroker(url=st.amqp_url)
    try:
        actor = baseline.declare(broker)
        started = datetime.now(UTC)
        for company in company_ids:
            for partition in partitions(days):
                actor.send(company, partition, JOBS_PER_PARTITION, version)
    finally:
        broker.close()
    dsn = database_dsn(st.database_url)

    def count() -> tuple[int, datetime | None]:
        with psycopg.connect(dsn) as conn:
            found = conn.execute(f"SELECT count(*), max(synced_at) FROM {baseline.TABLE}"
                                 " WHERE company_id = ANY(%s) AND synced_at >= %s", (company_ids, started)).fetchone()
        assert found is not None
        return found[0], found[1]

    wait_until(lambda: count()[0] >= tasks, timeout=3600, what=f"{tasks} baseline rows", interval=0.2)
    done, last = count()
    assert last is not None
    return Pass((last - started).total_seconds(), done)


def same_documents(st: Stack) -> int:
    """How many partitions the baseline and the pipeline stored with different checksums."""
    rows = st.admin_sql(
        f"SELECT count(*) FROM {baseline.TABLE} b JOIN datasets d ON d.company_id = b.company_id"
        " AND d.resource = b.resource AND d.partition_key = b.partition_key"
        " WHERE d.checksum_sha256 <> b.checksum_sha256"
    )
    return int(rows[0][0])


@contextlib.contextmanager
def pipeline_fleet(st: Stack, rt: Runtime, processes: int, threads: int) -> Iterator[Fleet]:
    assert st.amqp_url is not None
    env = settings_env(rt.settings)
    with fleet("pipeline worker", pipeline_worker_command(processes, threads), env,
               st.work / "pipeline-worker.log") as running:
        wait_for_consumers(st.amqp_url, rt.settings.queue_name, processes)
        yield running


@contextlib.contextmanager
def baseline_fleet(st: Stack, processes: int, threads: int) -> Iterator[Fleet]:
    assert st.amqp_url is not None and st.s3 is not None and st.bucket is not None
    env = settings_env(st.settings(), dramatiq_queue_prefetch=str(threads),
                       BENCH_BASELINE_AMQP_URL=st.amqp_url, BENCH_BASELINE_DSN=database_dsn(st.database_url),
                       BENCH_BASELINE_S3_ENDPOINT=st.s3.endpoint, BENCH_BASELINE_S3_KEY=st.s3.access_key,
                       BENCH_BASELINE_S3_SECRET=st.s3.secret_key, BENCH_BASELINE_BUCKET=st.bucket)
    with fleet("baseline worker", dramatiq_command("bench._baseline_worker", processes, threads), env,
               st.work / "baseline-worker.log") as running:
        wait_for_consumers(st.amqp_url, baseline.QUEUE, processes)
        yield running


def cpu_window(st: Stack, running: Fleet) -> CpuWindow:
    groups = {"workers": tree(running.process.pid),
              "postgres": matching("postgres", cmdline_contains=st.database_name)}
    if st.s3_pid is not None:
        # The S3 server by its process name ("weed" for SeaweedFS), not folded into the rest.
        groups[f"s3 ({psutil.Process(st.s3_pid).name()})"] = tree(st.s3_pid)
    groups["rabbitmq"] = matching("beam.smp")
    return CpuWindow(groups).start()


def wal_lsn(rt: Runtime) -> int:
    with rt.engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")).scalar_one())


def round_trips(rt: Runtime) -> tuple[Trips, Trips, list[float]]:
    """Round trips per task of a first sync and of an unchanged one, probed in this process, and
    the WAL written per task meanwhile (cluster-wide: an upper bound on a shared server)."""
    now = utcnow()
    with rt.engine.begin() as conn:
        company: int = conn.execute(insert(COMPANIES).values(
            name="Probe", external_id=f"probe-{uuid.uuid4().hex[:8]}", sync_enabled=True, connector="synthetic",
            connector_config={"jobs_per_day": JOBS_PER_PARTITION, "days_ahead": DAYS}, feature_toggles={},
            created_at=now, updated_at=now,
        ).returning(COMPANIES.c.id)).scalar_one()
    found = []
    wal = []
    for _ in range(2):
        planned = plan_job(rt.engine, None, trigger="schedule", resources=["schedule"], company_ids=[company])
        assert planned is not None
        before = wal_lsn(rt)
        found.append(probe(rt, lambda runtime, task_id: run_task(runtime, task_id), planned.task_ids))
        wal.append((wal_lsn(rt) - before) / len(planned.task_ids))
    return found[0], found[1], wal


def footprint(rt: Runtime) -> dict[str, tuple[int, float]]:
    """Rows and bytes per row (table + indexes + TOAST) of the tables that grow with syncs."""
    sizes = {}
    with rt.engine.connect() as conn:
        for table in ("sync_tasks", "datasets", "job_log", "sync_jobs"):
            rows = int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
            size = int(conn.execute(text(f"SELECT pg_total_relation_size('{table}')")).scalar_one())
            sizes[table] = (rows, size / rows if rows else 0.0)
    return sizes


def uploads_since(rt: Runtime, moment: datetime) -> int:
    with rt.engine.connect() as conn:
        return len(conn.execute(select(DATASETS.c.id).where(DATASETS.c.changed_at >= moment)).all())


@dataclass(frozen=True)
class Measured:
    """One timed pass and the CPU each group of processes used in it, in ms per task."""

    done: Pass
    cpu_ms: dict[str, float]

    @property
    def total_cpu_ms(self) -> float:
        return sum(self.cpu_ms.values())


@dataclass(frozen=True)
class Result:
    """The best of the rounds at one worker process count."""

    processes: int
    tasks: int
    baseline: Pass
    first: Pass
    second: Pass
    rewritten: int
    cpu_ms: tuple[float, float, float]  # per task, every measured group: baseline, first sync, unchanged data
    worker_cpu_ms: tuple[float, float, float]  # per task, the worker processes alone
    s3_cpu_ms: tuple[float, float, float]  # per task, the S3 server alone


@dataclass(frozen=True)
class Measurement:
    results: list[Result]
    differing: int
    first_trips: Trips
    second_trips: Trips
    wal_per_task: list[float]
    footprint: dict[str, tuple[int, float]]


def timed(st: Stack, running: Fleet, tasks: int, run: partial[Pass]) -> tuple[Measured, CpuWindow]:
    window = cpu_window(st, running)
    done = run()
    window.stop()
    return Measured(done, {name: 1000 * seconds / tasks for name, seconds in window.used.items()}), window


def measure_fleets(st: Stack, rt: Runtime, *, company_ids: list[int], warm: int, tasks: int, processes: int,
                   threads: int, repeat: int, first_version: int) -> Result:
    """Baseline, first sync and unchanged sync at ``processes`` worker processes, interleaved
    ``repeat`` times; the best of each counts. Every round's first sync gets new data (the
    synthetic connector's ``version``) so that it really writes every document again."""
    passes: dict[str, list[Measured]] = {"baseline": [], "first": [], "unchanged": []}
    rewritten = 0
    with baseline_fleet(st, processes, threads) as bare_fleet, pipeline_fleet(st, rt, processes,
                                                                              threads) as our_fleet:
        # Each fleet first runs a warm-up job (imports, connection pools), not timed.
        st.admin_sql(f"UPDATE companies SET sync_enabled = true WHERE id = {warm}")
        run_baseline(st, [warm], WARM_UP_TASKS, first_version)
        run_ours(rt, WARM_UP_TASKS, company_ids=[warm])
        st.admin_sql(f"UPDATE companies SET sync_enabled = false WHERE id = {warm}")
        for round_index in range(repeat):
            version = first_version + round_index
            if version:
                st.admin_sql("UPDATE companies SET connector_config = connector_config || "
                             f"'{{\"version\": {version}}}'")
            found, window = timed(st, bare_fleet, tasks, partial(run_baseline, st, company_ids, DAYS, version))
            passes["baseline"].append(found)
            print(f"  {processes} process(es), round {round_index + 1}, baseline actor: {found.done.rate:.1f} "
                  f"tasks/s; {window.describe(tasks)}", flush=True)
            for name in ("first", "unchanged"):
                moment = utcnow()
                time.sleep(0.01)
                found, window = timed(st, our_fleet, tasks, partial(run_ours, rt, tasks))
                passes[name].append(found)
                label = "first sync" if name == "first" else "unchanged data"
                print(f"  {processes} process(es), round {round_index + 1}, pipeline, {label}: "
                      f"{found.done.rate:.1f} tasks/s; {window.describe(tasks)}", flush=True)
                if name == "unchanged":
                    rewritten += uploads_since(rt, moment)
        bare_fleet.check_alive()
        our_fleet.check_alive()

    def best_pass(name: str) -> Pass:
        return max((found.done for found in passes[name]), key=lambda done: done.rate)

    def least(name: str, cpu: Callable[[Measured], float]) -> float:
        return min(cpu(found) for found in passes[name])

    def three(cpu: Callable[[Measured], float]) -> tuple[float, float, float]:
        return least("baseline", cpu), least("first", cpu), least("unchanged", cpu)

    return Result(processes, tasks, best_pass("baseline"), best_pass("first"), best_pass("unchanged"), rewritten,
                  three(lambda found: found.total_cpu_ms), three(lambda found: found.cpu_ms.get("workers", 0.0)),
                  three(lambda found: sum(ms for name, ms in found.cpu_ms.items() if name.startswith("s3"))))


def measure(tasks: int, process_counts: list[int], threads: int, repeat: int, profile: Path | None) -> Measurement:
    """``measure_fleets`` at each process count in turn, on one stack."""
    with stack("throughput") as st:
        rt = Runtime.from_settings(st.settings(blob="s3"))
        st.cleanups.callback(rt.close)
        warm = add_companies(rt, tasks // DAYS)
        with rt.engine.connect() as conn:
            company_ids = list(conn.execute(select(COMPANIES.c.id).where(COMPANIES.c.id != warm)).scalars())
        st.admin_sql(baseline.CREATE_TABLE)
        print(f"throughput: {tasks:,} partitions × {JOBS_PER_PARTITION} jobs, "
              f"{' / '.join(map(str, process_counts))} worker processes × {threads} threads, PostgreSQL + "
              f"RabbitMQ + S3 at {st.s3.endpoint if st.s3 else '?'}; best of {repeat}, rounds interleaved",
              flush=True)
        results = []
        for index, processes in enumerate(process_counts):
            results.append(measure_fleets(st, rt, company_ids=company_ids, warm=warm, tasks=tasks,
                                          processes=processes, threads=threads, repeat=repeat,
                                          first_version=index * repeat))
        differing = same_documents(st)
        if profile is not None:
            with pipeline_fleet(st, rt, process_counts[-1], threads) as our_fleet:
                # Warmed up like the measured fleets (imports, connection pools), not profiled.
                st.admin_sql(f"UPDATE companies SET sync_enabled = true WHERE id = {warm}")
                run_ours(rt, WARM_UP_TASKS, company_ids=[warm])
                st.admin_sql(f"UPDATE companies SET sync_enabled = false WHERE id = {warm}")
                profile_first_sync(st, rt, our_fleet, tasks, profile, version=len(process_counts) * repeat)
        sizes = footprint(rt)
        first_trips, second_trips, wal = round_trips(Runtime.from_settings(rt.settings, pre_ping=False))
    return Measurement(results, differing, first_trips, second_trips, wal, sizes)


def profile_first_sync(st: Stack, rt: Runtime, running: Fleet, tasks: int, directory: Path, *, version: int) -> None:
    """One more sync with changed data (every document new), under py-spy; not part of the figures."""
    st.admin_sql(f"UPDATE companies SET connector_config = connector_config || '{{\"version\": {version}}}'")
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / f"throughput-{uuid.uuid4().hex[:6]}.raw"
    with recording(running.process.pid, raw):
        profiled = run_ours(rt, tasks)
    summary = summarize(raw, top=40)
    raw.with_suffix(".txt").write_text(summary + "\n")
    print(f"  profiled sync (changed data, under py-spy): {profiled.rate:.1f} tasks/s; top frames:\n{summary}",
          flush=True)


def process_counts(value: str) -> list[int]:
    try:
        counts = [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated process counts like 1,2,4, got {value!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"process counts must be at least 1, got {value!r}")
    return counts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 partitions instead of 2,000")
    parser.add_argument("--partitions", type=int, help="partitions (a multiple of 8; overrides --quick)")
    parser.add_argument("--processes", type=process_counts, default=[1, 2, 4],
                        help="worker process counts, each measured beside the baseline at the same count "
                             "(default 1,2,4)")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker process (default 4)")
    parser.add_argument("--repeat", type=int, help="rounds of the three passes; the best counts (default 3; "
                                                   "--quick: 1)")
    parser.add_argument("--profile", type=Path, help="after the measured syncs, py-spy one more sync of changed "
                                                     "data; raw stacks and a summary go to this directory")
    args = parser.parse_args(argv)
    tasks = max(1, (args.partitions or (200 if args.quick else 2_000)) // DAYS) * DAYS
    repeat = args.repeat or (1 if args.quick else 3)
    found = retrying_blips(partial(measure, tasks, args.processes, args.threads, repeat, args.profile),
                           what="throughput")

    print(f"  round trips, first sync: {found.first_trips.describe()}")
    print(f"  round trips, unchanged data: {found.second_trips.describe()}")
    print("  round trips, baseline actor: 1 database round trip (one autocommit upsert) + 1 blob request (put)")
    print(f"  WAL per task (probe, cluster-wide upper bound): first sync {found.wal_per_task[0]:,.0f} B, "
          f"unchanged data {found.wal_per_task[1]:,.0f} B")
    print("  footprint after the runs: " + ", ".join(
        f"{table} {rows:,} rows × {per_row:,.0f} B" for table, (rows, per_row) in found.footprint.items()))
    print("  scaling, tasks/s by worker processes: pipeline first sync "
          + ", ".join(f"{r.processes}: {r.first.rate:.1f}" for r in found.results)
          + " · baseline actor " + ", ".join(f"{r.processes}: {r.baseline.rate:.1f}" for r in found.results)
          + " · pipeline unchanged data " + ", ".join(f"{r.processes}: {r.second.rate:.1f}" for r in found.results))
    rows: list[Row] = []
    for r in found.results:
        at = f"{r.processes} proc"
        rows += [
            row("throughput", f"first sync, {at} ({tasks:,} partitions)", r.first.rate, r.baseline.rate, "tasks/s",
                at_least(0.8), note=f"baseline: hand-written Dramatiq actor, {at}"),
            row("throughput", f"unchanged data, {at}", r.second.rate, r.first.rate, "tasks/s", at_least(2.0),
                note=f"baseline: the first sync; {r.rewritten} document(s) rewritten"),
            row("throughput", f"worker CPU per task, first sync, {at}", r.worker_cpu_ms[1], r.worker_cpu_ms[0], "ms",
                at_most(1.3), note=f"worker processes only; S3 server separately: ours {r.s3_cpu_ms[1]:.1f} ms, "
                                   f"baseline {r.s3_cpu_ms[0]:.1f} ms per task"),
            row("throughput", f"CPU per task, first sync, {at}", r.cpu_ms[1], r.cpu_ms[0], "ms",
                note="workers + PostgreSQL backends + S3 server (weed) + RabbitMQ; less noisy than wall time"),
            row("throughput", f"CPU per task, unchanged data, {at}", r.cpu_ms[2], r.cpu_ms[1], "ms",
                note="baseline: the first sync"),
        ]
    rows.append(row("throughput", "database round trips per single-chunk task", found.first_trips.database, 1, "",
                    at_most(4.0),
                    note="statements (pool pre-pings included) + BEGIN/COMMIT/ROLLBACK, counted on psycopg, "
                         "workers' engine settings; target ≤ 4 (the ratio is to the baseline's one)"))
    rows.append(row("throughput", "database round trips per unchanged task", found.second_trips.database, 1, "",
                    note="the same count, unchanged data"))
    print_table(rows)
    print(load_line())
    rewritten = sum(r.rewritten for r in found.results)
    ok = (found.differing == 0 and rewritten == 0 and found.first_trips.database <= 4.0
          and all(r.met is not False for r in rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
