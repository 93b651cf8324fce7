"""Metadata size benchmark: ``python -m bench metadata [--quick]``.

Syncs N partitions of a 50-job schedule (2,000; ``--quick``: 200) through the real pipeline
(``plan_job`` + ``run_task``, in this process, on a fresh PostgreSQL database and a local blob
directory), then measures ``pg_total_relation_size`` of ``datasets`` (table, TOAST and
indexes) per row.

Baseline: the same documents stored the old way, one JSONB row per partition in a bench-only
table with the same unique key — what the pipeline replaces. Both tables are vacuumed first.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import psycopg
from sqlalchemy import select

from bench._report import Row, load_line, print_table, row
from bench._stack import Stack, add_synthetic_companies, database_dsn, retrying_blips, stack
from pipeline.execution import Outcome, run_task
from pipeline.models import DATASETS
from pipeline.planning import plan_job
from pipeline.runtime import Runtime

DAYS = 8
JOBS_PER_PARTITION = 50
FLEET_PARTITIONS = 80_000  # 10,000 companies × 8 partitions, as in the fan-out benchmark
JSONB_TABLE = "bench_jsonb_documents"
# The design this replaces claims "metadata of about 50 MB instead of 2 GB of JSONB"; the
# target is to stay under 50 MB of dataset rows for the fan-out benchmark's 80,000 partitions.
TARGET_MB = 50.0


def add_companies(rt: Runtime, count: int) -> None:
    add_synthetic_companies(rt, count, {"jobs_per_day": JOBS_PER_PARTITION, "days_ahead": DAYS})


def sync_all(rt: Runtime, threads: int) -> int:
    planned = plan_job(rt.engine, None, trigger="cli", resources=["schedule"])
    assert planned is not None
    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(lambda task_id: run_task(rt, task_id), planned.task_ids))
    failed = [outcome for outcome in outcomes if outcome is not Outcome.COMPLETED]
    if failed:
        raise RuntimeError(f"{len(failed)} task(s) did not complete: {failed[:5]}")
    return len(outcomes)


def store_as_jsonb(st: Stack, rt: Runtime) -> None:
    st.admin_sql(
        f"CREATE TABLE {JSONB_TABLE} (id BIGSERIAL PRIMARY KEY, company_id BIGINT NOT NULL, resource TEXT NOT NULL,"
        " partition_key TEXT NOT NULL, document JSONB NOT NULL, synced_at TIMESTAMPTZ NOT NULL,"
        " UNIQUE (company_id, resource, partition_key))"
    )
    with rt.engine.connect() as conn:
        rows = conn.execute(select(DATASETS.c.company_id, DATASETS.c.resource, DATASETS.c.partition_key,
                                   DATASETS.c.storage_key, DATASETS.c.synced_at)).all()
    with psycopg.connect(database_dsn(st.database_url)) as raw, raw.cursor() as cursor:
        with cursor.copy(f"COPY {JSONB_TABLE} (company_id, resource, partition_key, document, synced_at)"
                         " FROM STDIN") as copy:
            for found in rows:
                # The stored bytes as JSON text: PostgreSQL parses them into JSONB itself.
                document = rt.store.get(found.storage_key).decode()
                copy.write_row((found.company_id, found.resource, found.partition_key, document, found.synced_at))
        raw.commit()


def bytes_per_row(st: Stack, table: str) -> tuple[float, int]:
    st.admin_sql(f"VACUUM ANALYZE {table}")
    (size, count), = st.admin_sql(f"SELECT pg_total_relation_size('{table}'), (SELECT count(*) FROM {table})")
    return size / count, count


@dataclass(frozen=True)
class Sizes:
    partitions: int
    document_bytes: float
    dataset_row: float
    jsonb_row: float
    task_row: float
    retention_days: int


def measure(partitions: int, threads: int) -> Sizes:
    with stack("metadata", broker=False, s3=False) as st:
        rt = Runtime.from_settings(st.settings(blob="local"))
        st.cleanups.callback(rt.close)
        add_companies(rt, max(1, partitions // DAYS))
        synced = sync_all(rt, threads)
        store_as_jsonb(st, rt)
        ours, _ = bytes_per_row(st, "datasets")
        old, _ = bytes_per_row(st, JSONB_TABLE)
        task_bytes, _ = bytes_per_row(st, "sync_tasks")
        (document_bytes,), = st.admin_sql("SELECT avg(size_bytes)::float FROM datasets")
        return Sizes(synced, document_bytes, ours, old, task_bytes, rt.settings.retention_days)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench metadata", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 partitions instead of 2,000")
    parser.add_argument("--partitions", type=int, help="partitions (a multiple of 8; overrides --quick)")
    parser.add_argument("--threads", type=int, default=4, help="threads running tasks (default 4)")
    args = parser.parse_args(argv)
    partitions = args.partitions or (200 if args.quick else 2_000)
    sizes = retrying_blips(partial(measure, partitions, args.threads), what="metadata")

    print(f"metadata: {sizes.partitions:,} partitions of a {JOBS_PER_PARTITION}-job schedule, documents of "
          f"{sizes.document_bytes / 1000:.1f} kB on average", flush=True)
    ours_mb = sizes.dataset_row * FLEET_PARTITIONS / 1e6
    old_mb = sizes.jsonb_row * FLEET_PARTITIONS / 1e6
    kept = FLEET_PARTITIONS * 24 * sizes.retention_days
    tasks = (f"a sync_tasks row takes {sizes.task_row:.0f} B: hourly jobs of {FLEET_PARTITIONS:,} tasks kept "
             f"{sizes.retention_days} days are {kept * sizes.task_row / 1e9:.1f} GB")
    met = ours_mb <= TARGET_MB
    print_table([
        row("metadata", f"bytes per datasets row ({sizes.partitions:,} rows)", sizes.dataset_row, sizes.jsonb_row,
            "B", note="baseline: the same documents as JSONB rows (TOAST-compressed), same unique key"),
        Row("metadata", f"datasets for {FLEET_PARTITIONS:,} partitions", ours_mb, old_mb, "MB", f"≤ {TARGET_MB:g} MB",
            met, note=tasks),
    ])
    print(load_line())
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
