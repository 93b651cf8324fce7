"""One checker for DESIGN.md's invariants, shared by integration and reliability tests."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter

import orjson
from minio import Minio
from sqlalchemy import Engine, select

from connectors.transforms import DOCUMENT_ROWS
from pipeline.models import Dataset, SyncJob, SyncTask


def check_job_counters(engine: Engine, job_id: uuid.UUID) -> dict[str, int]:
    """The job's counters equal its tasks' states, and nothing is left pending or processing."""
    with engine.connect() as conn:
        job = conn.execute(select(SyncJob.__table__).where(SyncJob.id == job_id)).one()
        states = Counter(conn.execute(select(SyncTask.status).where(SyncTask.job_id == job_id)).scalars())
        records = sum(conn.execute(
            select(SyncTask.record_count).where(SyncTask.job_id == job_id, SyncTask.status == "completed")
        ).scalars())
    assert states["pending"] == 0 and states["processing"] == 0, f"stranded tasks: {dict(states)}"
    assert job.total_tasks == sum(states.values())
    assert job.completed_tasks == states["completed"], (job.completed_tasks, dict(states))
    assert job.failed_tasks == states["failed"], (job.failed_tasks, dict(states))
    assert job.cancelled_tasks == states["cancelled"], (job.cancelled_tasks, dict(states))
    assert job.processed_records == records
    expected = "failed" if states["failed"] else ("cancelled" if states["cancelled"] else "completed")
    assert job.status == expected, (job.status, dict(states))
    assert job.completed_at is not None
    return dict(states)


def check_datasets(engine: Engine, client: Minio, bucket: str) -> int:
    """Every dataset row's object exists, its bytes (read with the minio SDK) hash to its
    checksum, and its document has no duplicate rows. Returns the number of rows checked."""
    with engine.connect() as conn:
        rows = conn.execute(select(Dataset.__table__)).all()
    for row in rows:
        response = client.get_object(bucket, row.storage_key)
        try:
            data = response.read()
        finally:
            response.close()
            response.release_conn()
        assert hashlib.sha256(data).hexdigest() == row.checksum_sha256, row.storage_key
        assert len(data) == row.size_bytes
        assert row.storage_key == f"{row.company_id}/{row.resource}/{row.partition_key}/{row.checksum_sha256}.json"
        document = orjson.loads(data)
        key = DOCUMENT_ROWS.get(row.resource if row.resource in DOCUMENT_ROWS else "identity", "records")
        items = document.get("jobs") or document.get("users") or document.get(key) or []
        ids = [item.get("id", item.get("EmployeeInformationId")) if isinstance(item, dict) else item
               for item in items]
        assert len(ids) == len(set(map(str, ids))), f"duplicate records in {row.storage_key}"
        assert len(items) == row.record_count
    return len(rows)
