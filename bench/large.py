"""Large-partition benchmark: ``python -m bench large [--quick]``.

One partition of 1,000,000 synthetic job records through continuations on the local blob
store, then one of 200,000 on S3 (``--quick``: 50,000 and 20,000), each through ``pipeline
worker`` subprocesses with ``TASK_TIME_BUDGET_S`` = 5 s (``--quick``: 1 s) and pages of 5,000
records, so the task runs as many chunks and continuation messages. Figures: records/s from planning to the
job's ``completed_at``, and peak RSS — the largest kernel high-water mark (``VmHWM``) of any
single process of the worker tree (the target, ≤ 300 MB), next to the whole tree's peak sum.

Baseline, in a subprocess of its own on the same machine: the same records fetched in one
page and rendered in memory in one go (``orjson.dumps`` of the whole document, then SHA-256)
— its time and its peak RSS (``ru_maxrss``), so the ratio shows what streaming costs in time
and saves in memory. The benchmark checks that both produce the same checksum.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import orjson
from sqlalchemy import func, insert, select

from actors.broker import make_broker
from actors.tasks import declare_actors
from bench._fleet import Fleet, MemoryPeak, fleet, pipeline_worker_command
from bench._report import Row, load_line, print_table, row
from bench._stack import ROOT, Stack, retrying_blips, settings_env, stack, wait_for_consumers, wait_until
from connectors.base import FetchRequest
from connectors.synthetic import SyntheticConnector
from connectors.transforms import schedule
from pipeline.models import COMPANIES, DATASETS, JOB_LOG, JOBS, TASKS, utcnow
from pipeline.planning import plan_job
from pipeline.runtime import Runtime

PAGE_SIZE = 5_000
BUDGET_S = 5.0
QUICK_BUDGET_S = 1.0  # the quick partitions are small: a shorter budget still forces continuations
RSS_TARGET_MB = 300.0
PARTITION_DAYS = 1


@dataclass(frozen=True)
class Outcome:
    records: int
    seconds: float
    peak: MemoryPeak
    chunks: int
    continuations: int
    checksum: str
    last_message_s: float  # the final message: the last chunks, then assembly and publish

    @property
    def rate(self) -> float:
        return self.records / self.seconds


@dataclass(frozen=True)
class InMemory:
    seconds: float
    rss_mb: float
    checksum: str

    def rate(self, records: int) -> float:
        return records / self.seconds


def config(records: int) -> dict[str, int]:
    return {"jobs_per_day": records, "days_ahead": PARTITION_DAYS, "page_size": PAGE_SIZE}


def render_in_memory(company_id: int, partition: str, records: int) -> InMemory:
    """Run in a fresh interpreter (``--in-memory``), so that its peak RSS is its own."""
    command = [sys.executable, "-m", "bench.large", "--in-memory", str(records), str(company_id), partition]
    output = subprocess.run(command, cwd=ROOT, capture_output=True, check=True).stdout
    figures = orjson.loads(output)
    return InMemory(figures["seconds"], figures["rss_mb"], figures["checksum"])


def _in_memory_main(records: int, company_id: int, partition: str) -> int:
    start = time.perf_counter()
    connector = SyntheticConnector({**config(records), "page_size": max(records, 1)})
    chunk = connector.fetch(FetchRequest(company_id=company_id, external_id=None, resource="schedule",
                                         partition=partition))
    body = orjson.dumps(schedule(company_id, "schedule", partition, chunk.records), option=orjson.OPT_SORT_KEYS)
    checksum = hashlib.sha256(body).hexdigest()
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    sys.stdout.write(orjson.dumps({"seconds": seconds, "rss_mb": rss_mb, "checksum": checksum}).decode())
    return 0


@contextlib.contextmanager
def workers(st: Stack, rt: Runtime, processes: int, threads: int, label: str) -> Iterator[Fleet]:
    assert st.amqp_url is not None
    with fleet(f"pipeline worker ({label})", pipeline_worker_command(processes, threads), settings_env(rt.settings),
               st.work / f"worker-{label}.log") as running:
        wait_for_consumers(st.amqp_url, rt.settings.queue_name, processes)
        yield running


def sync_one(st: Stack, rt: Runtime, running: Fleet, company_id: int, records: int) -> Outcome:
    broker = make_broker(rt.settings)
    try:
        started = datetime.now(UTC)
        planned = plan_job(rt.engine, declare_actors(broker, rt), trigger="cli", company_ids=[company_id],
                           resources=["schedule"])
    finally:
        broker.close()
    assert planned is not None and planned.total_tasks == 1

    def finished() -> bool:
        running.check_alive()
        with rt.engine.connect() as conn:
            status = conn.execute(select(JOBS.c.status).where(JOBS.c.id == planned.job_id)).scalar_one()
        return status in {"completed", "failed", "cancelled"}

    wait_until(finished, timeout=7200, what=f"the {records:,}-record partition", interval=0.5)
    running.sample()
    with rt.engine.connect() as conn:
        job = conn.execute(select(JOBS).where(JOBS.c.id == planned.job_id)).one()
        task = conn.execute(select(TASKS).where(TASKS.c.job_id == planned.job_id)).one()
        continuations, last_hand_off = conn.execute(select(func.count(), func.max(JOB_LOG.c.created_at)).where(
            JOB_LOG.c.task_id == task.id, JOB_LOG.c.message.like("continuation after chunk%"))).one()
        dataset = conn.execute(select(DATASETS).where(DATASETS.c.company_id == company_id)).one()
    if job.status != "completed" or dataset.record_count != records:
        raise RuntimeError(f"job {job.id} ended {job.status} with {dataset.record_count} records: {task.error_message}"
                           f"\n{running.log_tail()}")
    return Outcome(records=records, seconds=(job.completed_at - started).total_seconds(),
                   peak=MemoryPeak(running.peak.process_mb, running.peak.tree_mb), chunks=task.chunks,
                   continuations=int(continuations), checksum=dataset.checksum_sha256,
                   last_message_s=(job.completed_at - (last_hand_off or started)).total_seconds())


def add_company(rt: Runtime, records: int, name: str) -> int:
    now = utcnow()
    with rt.engine.begin() as conn:
        company: int = conn.execute(insert(COMPANIES).values(
            name=name, external_id=name, sync_enabled=True, connector="synthetic", connector_config=config(records),
            feature_toggles={}, created_at=now, updated_at=now,
        ).returning(COMPANIES.c.id)).scalar_one()
    return company


def run_case(st: Stack, blob: str, records: int, processes: int, threads: int, budget_s: float,
             lease_s: float | None = None) -> list[Row]:
    overrides = {} if lease_s is None else {"lease_s": lease_s}
    rt = Runtime.from_settings(st.settings(blob=blob, task_time_budget_s=budget_s, **overrides))
    try:
        company = add_company(rt, records, f"large-{blob}-{uuid.uuid4().hex[:8]}")
        partition = utcnow().date().isoformat()
        with workers(st, rt, processes, threads, blob) as running:
            ours = sync_one(st, rt, running, company, records)
    finally:
        rt.close()
    memory = render_in_memory(company, partition, records)
    where = "local blob store" if blob == "local" else "S3"
    print(f"  {where}: {records:,} records in {ours.seconds:.1f} s ({ours.chunks} chunks, {ours.continuations} "
          f"continuation messages); peak RSS {ours.peak.process_mb:.0f} MB per process, "
          f"{ours.peak.tree_mb:.0f} MB for the tree · in memory: {memory.seconds:.1f} s, "
          f"{memory.rss_mb:.0f} MB", flush=True)
    limits = rt.settings
    print(f"    the last message (final chunks, assembly, publish) ran {ours.last_message_s:.1f} s: budget "
          f"{limits.task_time_budget_s:g} s, lease {limits.lease_seconds:g} s, Dramatiq TimeLimit "
          f"{limits.message_time_limit_ms / 1000:g} s" + (" — LONGER THAN THE LEASE" if ours.last_message_s >
                                                           limits.lease_seconds else ""), flush=True)
    same = "same checksum" if memory.checksum == ours.checksum else "CHECKSUMS DIFFER"
    rss_ok = ours.peak.process_mb <= RSS_TARGET_MB
    return [
        row("large", f"{records:,} records, {where}", ours.rate, memory.rate(records), "records/s",
            note=f"baseline: one page rendered in memory in one go; {same}"),
        Row("large", f"peak worker RSS, {where}", ours.peak.process_mb, memory.rss_mb, "MB",
            f"≤ {RSS_TARGET_MB:g} MB", rss_ok and memory.checksum == ours.checksum,
            note=f"largest VmHWM of one worker process; whole tree {ours.peak.tree_mb:.0f} MB "
                 f"({processes} processes × {threads} threads + the Dramatiq CLI parent)"),
    ]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--in-memory"]:
        return _in_memory_main(int(argv[1]), int(argv[2]), argv[3])
    parser = argparse.ArgumentParser(prog="python -m bench large", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50,000 (local) and 20,000 (S3) records")
    parser.add_argument("--local-records", type=int, help="records on the local blob store (overrides --quick)")
    parser.add_argument("--s3-records", type=int, help="records on S3 (overrides --quick)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="threads per worker process (default 2)")
    parser.add_argument("--budget", type=float, help=f"TASK_TIME_BUDGET_S (default {BUDGET_S:g}; --quick: "
                                                     f"{QUICK_BUDGET_S:g})")
    parser.add_argument("--lease", type=float, help="PIPELINE_LEASE_S (default budget × 2 + 30); shorter than the "
                                                    "final assembly exercises the lease heartbeat")
    args = parser.parse_args(argv)
    local = args.local_records if args.local_records is not None else (50_000 if args.quick else 1_000_000)
    remote = args.s3_records if args.s3_records is not None else (20_000 if args.quick else 200_000)
    budget = args.budget or (QUICK_BUDGET_S if args.quick else BUDGET_S)

    rows: list[Row] = []
    with stack("large") as st:
        print(f"large: pages of {PAGE_SIZE:,} records, TASK_TIME_BUDGET_S={budget:g}, {args.processes} worker "
              f"processes × {args.threads} threads", flush=True)
        if local:
            rows += retrying_blips(partial(run_case, st, "local", local, args.processes, args.threads, budget,
                                           args.lease), what="large, local")
        if remote:
            rows += retrying_blips(partial(run_case, st, "s3", remote, args.processes, args.threads, budget,
                                           args.lease), what="large, S3")
    print_table(rows)
    print(load_line())
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
