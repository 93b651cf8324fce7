"""Publishing documents: serialize, checksum, upload an immutable object, commit the pointer.

Invariant 2: a ``datasets`` row only points at bytes that exist and hash to its checksum.
Objects are content-addressed (``{company}/{resource}/{partition}/{sha256}.json``), so an
upload never changes bytes a row already points at. "Upload, then commit the pointer" — and
the commit re-checks under the partition's lock that the object is still there, because the
garbage collector (``pipeline.cleanup``) deletes unreferenced objects under the same lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from pipeline.jobs import Claim, complete_task
from pipeline.models import DATASETS, utcnow
from pipeline.runtime import Runtime
from storage.base import BlobStore
from storage.checksum import sha256_hex

STAGING_PREFIX = "_staging"


def serialize(document: Any) -> bytes:
    """Deterministic JSON: the same document always gives the same bytes."""
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def storage_key(company_id: int, resource: str, partition: str, checksum: str) -> str:
    return f"{company_id}/{resource}/{partition}/{checksum}.json"


def staging_prefix(task_id: int) -> str:
    return f"{STAGING_PREFIX}/{task_id}/"


def stage_chunk(store: BlobStore, task_id: int, index: int, records: Iterable[Any]) -> None:
    """Write one chunk's records as NDJSON; re-staging the same index replaces it."""
    body = b"".join(orjson.dumps(record) + b"\n" for record in records)
    store.put(f"{staging_prefix(task_id)}{index:06d}.ndjson", body, content_type="application/x-ndjson")


def read_staged(store: BlobStore, task_id: int, chunks: int) -> Iterator[Any]:
    """Yield the staged records of chunks ``0 .. chunks-1`` in order, streaming each part."""
    for index in range(chunks):
        pending = b""
        for block in store.open(f"{staging_prefix(task_id)}{index:06d}.ndjson"):
            pending += block
            lines = pending.split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line:
                    yield orjson.loads(line)
        if pending.strip():
            yield orjson.loads(pending)


def remove_staging(store: BlobStore, task_id: int) -> int:
    removed = 0
    for info in list(store.list(staging_prefix(task_id))):
        store.delete(info.key)
        removed += 1
    return removed


def lock_partition(conn: Connection, company_id: int, resource: str, partition: str) -> None:
    """Serialise publishers and the garbage collector on one partition until commit.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: every write transaction already
    starts with BEGIN IMMEDIATE, which holds the database's single write lock.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
            {"key": f"{company_id}/{resource}/{partition}"},
        )


def _upsert_dataset(conn: Connection, values: dict[str, Any]) -> None:
    keys = ["company_id", "resource", "partition_key"]
    updates = {k: v for k, v in values.items() if k not in keys}
    if conn.dialect.name == "postgresql":
        pg = postgresql.insert(DATASETS).values(**values)
        conn.execute(pg.on_conflict_do_update(index_elements=keys, set_=updates))
    else:
        lite = sqlite.insert(DATASETS).values(**values)
        conn.execute(lite.on_conflict_do_update(index_elements=keys, set_=updates))


@dataclass(frozen=True, slots=True)
class Published:
    checksum: str
    size: int
    record_count: int
    uploaded: bool
    job_finished: bool


def publish(rt: Runtime, claim: Claim, payload: bytes, *, record_count: int, chunks: int) -> Published:
    """Store ``payload`` as the partition's current version and complete the task, atomically.

    Same checksum as the current version → no upload, only ``synced_at`` moves (invariant 5).
    Otherwise upload first, then ONE transaction: dataset pointer, task completed, job counters.

    Raises:
        LeaseLost / TaskCancelled: the transaction is rolled back and nothing is published.
        StorageError: the upload failed; nothing was committed.
    """
    checksum = sha256_hex(payload)
    key = storage_key(claim.company_id, claim.resource, claim.partition, checksum)
    where = (
        (DATASETS.c.company_id == claim.company_id)
        & (DATASETS.c.resource == claim.resource)
        & (DATASETS.c.partition_key == claim.partition)
    )
    metadata = {"sha256": checksum, "record-count": str(record_count)}
    with rt.engine.connect() as conn:
        current = conn.execute(select(DATASETS.c.checksum_sha256).where(where)).scalar_one_or_none()
    uploaded = False
    if current != checksum:
        rt.store.put(key, payload, metadata=metadata)
        uploaded = True
    now = utcnow()
    with rt.engine.begin() as conn:
        lock_partition(conn, claim.company_id, claim.resource, claim.partition)
        current = conn.execute(select(DATASETS.c.checksum_sha256).where(where)).scalar_one_or_none()
        if current == checksum:
            conn.execute(update(DATASETS).where(where).values(synced_at=now))
        else:
            if rt.store.stat(key) is None:
                rt.store.put(key, payload, metadata=metadata)
                uploaded = True
            _upsert_dataset(conn, {
                "company_id": claim.company_id, "resource": claim.resource, "partition_key": claim.partition,
                "storage_key": key, "checksum_sha256": checksum, "size_bytes": len(payload),
                "record_count": record_count, "synced_at": now, "changed_at": now,
            })
        finished = complete_task(conn, claim, record_count=record_count, chunks=chunks)
    return Published(checksum, len(payload), record_count, uploaded, finished)
