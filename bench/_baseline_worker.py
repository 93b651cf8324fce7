"""The throughput baseline: a minimal hand-written Dramatiq actor, none of the pipeline's machinery.

Run by the benchmark as ``dramatiq bench._baseline_worker --processes P --threads T`` (the same
counts as ``pipeline worker``). Per message it does what a sync of one small partition has to
do, and nothing else: fetch the synthetic connector's records, render the schedule document,
hash it, upload it (minio ``put_object``), and upsert one row. No claim, no lease, no
staging, no job counters, no retries beyond Dramatiq's defaults.

Configured by ``BENCH_BASELINE_*`` variables (set by ``bench.throughput``).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from typing import Any

import dramatiq
import orjson
import psycopg
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from minio import Minio

from connectors.base import FetchRequest
from connectors.synthetic import SyntheticConnector
from connectors.transforms import schedule

QUEUE = "baseline"
ACTOR = "baseline_sync"
TABLE = "bench_baseline_datasets"
CREATE_TABLE = (
    f"CREATE TABLE {TABLE} (company_id BIGINT NOT NULL, resource TEXT NOT NULL, partition_key TEXT NOT NULL,"
    " storage_key TEXT NOT NULL, checksum_sha256 TEXT NOT NULL, size_bytes BIGINT NOT NULL,"
    " record_count INTEGER NOT NULL, synced_at TIMESTAMPTZ NOT NULL, changed_at TIMESTAMPTZ NOT NULL,"
    " UNIQUE (company_id, resource, partition_key))"
)
UPSERT = (
    f"INSERT INTO {TABLE} VALUES (%s, 'schedule', %s, %s, %s, %s, %s, clock_timestamp(), clock_timestamp())"
    " ON CONFLICT (company_id, resource, partition_key) DO UPDATE SET storage_key = EXCLUDED.storage_key,"
    " checksum_sha256 = EXCLUDED.checksum_sha256, size_bytes = EXCLUDED.size_bytes,"
    " record_count = EXCLUDED.record_count, synced_at = EXCLUDED.synced_at, changed_at = EXCLUDED.changed_at"
)

_local = threading.local()


def _connection() -> psycopg.Connection[Any]:
    connection: psycopg.Connection[Any] | None = getattr(_local, "connection", None)
    if connection is None or connection.closed:
        connection = _local.connection = psycopg.connect(os.environ["BENCH_BASELINE_DSN"], autocommit=True)
    return connection


_client: Minio | None = None


def _minio() -> Minio:
    global _client
    if _client is None:
        _client = Minio(os.environ["BENCH_BASELINE_S3_ENDPOINT"], access_key=os.environ["BENCH_BASELINE_S3_KEY"],
                        secret_key=os.environ["BENCH_BASELINE_S3_SECRET"], secure=False)
    return _client


def sync(company_id: int, partition: str, jobs: int, version: int) -> None:
    connector = SyntheticConnector({"jobs_per_day": jobs, "days_ahead": 8, "version": version})
    records = connector.fetch(FetchRequest(company_id=company_id, external_id=None, resource="schedule",
                                           partition=partition)).records
    body = orjson.dumps(schedule(company_id, "schedule", partition, records), option=orjson.OPT_SORT_KEYS)
    checksum = hashlib.sha256(body).hexdigest()
    key = f"baseline/{company_id}/schedule/{partition}/{checksum}.json"
    _minio().put_object(os.environ["BENCH_BASELINE_BUCKET"], key, io.BytesIO(body), len(body),
                        content_type="application/json", metadata={"sha256": checksum})
    _connection().execute(UPSERT, (company_id, partition, key, checksum, len(body), len(records)))


def declare(broker: dramatiq.Broker) -> dramatiq.Actor[[int, str, int, int], None]:
    return dramatiq.actor(broker=broker, actor_name=ACTOR, queue_name=QUEUE)(sync)


if "BENCH_BASELINE_AMQP_URL" in os.environ:
    # Imported by the Dramatiq CLI: the broker it looks up globally.
    broker = RabbitmqBroker(url=os.environ["BENCH_BASELINE_AMQP_URL"])
    dramatiq.set_broker(broker)
    actor = declare(broker)
