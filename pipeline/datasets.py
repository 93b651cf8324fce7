"""Publishing documents: serialize, checksum, upload an immutable object, commit the pointer.

Invariant 2: a ``datasets`` row only points at bytes that exist and hash to its checksum.
Objects are content-addressed (``{company}/{resource}/{partition}/{sha256}.json``), so an
upload never changes bytes a row already points at. "Upload, then commit the pointer" — and
the commit re-checks under the partition's lock that the object is still there, because the
garbage collector (``pipeline.cleanup``) deletes unreferenced objects under the same lock
(a small document is uploaded under that lock, so there is nothing to re-check).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson
import psycopg
from sqlalchemy import Connection, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from pipeline import metrics
from pipeline.assembly import SPOOL_BYTES, RenderedDocument, encode_record, read_ndjson
from pipeline.db import driver_autocommit, execute_one
from pipeline.errors import LeaseLost, TaskCancelled, VersionChanged
from pipeline.jobs import Claim, complete_task, complete_task_guarded, fence_lost
from pipeline.models import CURSORS, DATASETS, utcnow
from pipeline.runtime import Runtime
from storage.base import BlobStore

STAGING_PREFIX = "_staging"
# Documents up to this size (still in memory, see pipeline.assembly) are uploaded inside the
# publishing transaction; larger ones before it.
INLINE_UPLOAD_BYTES = SPOOL_BYTES
# Documents up to this size are uploaded from one bytes object rather than streamed from the spool.
SMALL_BODY_BYTES = 1024 * 1024


def serialize(document: Any) -> bytes:
    """Deterministic JSON: the same document always gives the same bytes."""
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def storage_key(company_id: int, resource: str, partition: str, checksum: str) -> str:
    return f"{company_id}/{resource}/{partition}/{checksum}.json"


def staging_prefix(task_id: int) -> str:
    return f"{STAGING_PREFIX}/{task_id}/"


def staging_key(task_id: int, token: str, index: int) -> str:
    """Where one claim stages chunk ``index`` of a task: under the claim's fencing token, so a
    worker that lost its lease never overwrites a part the live lineage recorded (defect 1)."""
    return f"{staging_prefix(task_id)}{token}/{index:06d}.ndjson"


def legacy_staging_key(task_id: int, index: int) -> str:
    """Where chunks were staged before keys carried the claim's token (read, never written)."""
    return f"{staging_prefix(task_id)}{index:06d}.ndjson"


def stage_chunk(store: BlobStore, key: str, records: Iterable[Any]) -> None:
    """Write one chunk's records as NDJSON at ``key`` (see ``staging_key``).

    Raises:
        BadRecord: a record cannot be encoded (an integer beyond 64 bits, a lone surrogate).
    """
    body = b"".join(encode_record(record, position) + b"\n" for position, record in enumerate(records))
    store.put(key, body, content_type="application/x-ndjson")


def staged_part(store: BlobStore, key: str) -> Iterator[Any]:
    """Stream the records of one staged part."""
    return read_ndjson(store.open(key))


def document_key_of(records_key: str) -> str:
    """The document key a raw-records sidecar belongs to."""
    return records_key.removesuffix(".records.ndjson") + ".json"


def records_key(storage_key: str) -> str:
    """Where the raw records of a version lie (incremental resources merge into them)."""
    return storage_key.removesuffix(".json") + ".records.ndjson"


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


def _upsert_dataset_statement(conn: Connection, values: dict[str, Any]) -> Any:
    keys = ["company_id", "resource", "partition_key"]
    updates = {k: v for k, v in values.items() if k not in keys}
    if conn.dialect.name == "postgresql":
        return postgresql.insert(DATASETS).values(**values).on_conflict_do_update(index_elements=keys, set_=updates)
    return sqlite.insert(DATASETS).values(**values).on_conflict_do_update(index_elements=keys, set_=updates)



def _upsert_cursor(conn: Connection, claim: Claim, bookmark: str, now: Any) -> None:
    keys = ["company_id", "resource", "partition_key"]
    values = {"company_id": claim.company_id, "resource": claim.resource, "partition_key": claim.partition,
              "bookmark": bookmark, "updated_at": now}
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(CURSORS).values(**values)
                 .on_conflict_do_update(index_elements=keys, set_={"bookmark": bookmark, "updated_at": now}))


# Revision 0007's function: the whole publishing transaction in one statement (PostgreSQL).
PUBLISH_SQL = (
    "SELECT pipeline_publish(%(task_id)s::bigint, %(token)s::text, %(company_id)s::bigint, %(resource)s::text,"
    " %(partition)s::text, %(check_version)s::boolean, %(expected)s::text, %(checksum)s::text,"
    " %(storage_key)s::text, %(size)s::bigint, %(record_count)s::integer, %(chunks)s::integer,"
    " %(bookmark)s::text, %(now)s::timestamptz, %(uploaded)s::boolean, %(unlock)s::boolean)"
)
SESSION_LOCK_SQL = "SELECT pg_advisory_lock(hashtextextended(%(key)s, 0))"
SESSION_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtextextended(%(key)s, 0))"


def _partition_key(claim: Claim) -> str:
    """The key of the partition's advisory lock (``lock_partition``, and revision 0007's function)."""
    return f"{claim.company_id}/{claim.resource}/{claim.partition}"


def _outcome(claim: Claim, outcome: str, expected: str | None) -> bool:
    """What ``pipeline_publish`` answered, as ``publish`` reports it: whether the job finished.

    Raises:
        VersionChanged / TaskCancelled / LeaseLost: nothing was written.
    """
    if outcome in ("published", "finished"):
        return outcome == "finished"
    kind, _, detail = outcome.partition(":")
    if kind == "changed":
        raise VersionChanged(
            f"partition {claim.company_id}/{claim.resource}/{claim.partition} was published by another task "
            f"after this sync started (version {expected or 'none'} → {detail or None}); starting over")
    if kind == "lost" and detail == "cancelled":
        raise TaskCancelled(f"task {claim.task_id} was cancelled")
    if kind == "lost":
        raise LeaseLost(f"task {claim.task_id} is no longer held by this worker (status {detail or None})")
    raise RuntimeError(f"pipeline_publish answered {outcome!r}")  # pragma: no cover - a bug


def _publish_in_one_statement(
    rt: Runtime, claim: Claim, document: RenderedDocument, *, key: str, chunks: int, bookmark: str | None,
    expected: str | None, check_version: bool, upload: Callable[[], None] | None,
) -> tuple[bool, bool] | None:
    """PostgreSQL: publish with revision 0007's ``pipeline_publish``, in autocommit.

    When the lineage's base version has this very checksum (``check_version`` and ``expected``
    equal to it), the function is first called without an upload: unchanged data costs that one
    round trip (invariant 5: only ``synced_at`` moves). Otherwise (or if it answers ``upload``)
    and ``upload`` is given, the partition's session-level advisory lock is taken, the document
    uploaded under it (the garbage collector cannot delete it before the pointer commits), and
    the function called once more: it takes the transaction-scoped lock, drops the session one
    and commits — lock, upload, publish: two round trips and one PUT. Returns ``(job finished,
    uploaded)``, or ``None`` in place of them when ``upload`` is ``None`` and one is needed.

    Raises:
        LeaseLost / TaskCancelled / VersionChanged: nothing was written.
    """
    params: dict[str, Any] = {
        "task_id": claim.task_id, "token": claim.token, "company_id": claim.company_id, "resource": claim.resource,
        "partition": claim.partition, "check_version": check_version, "expected": expected,
        "checksum": document.checksum, "storage_key": key, "size": document.size,
        "record_count": document.record_count, "chunks": chunks, "bookmark": bookmark, "now": utcnow(),
    }
    lock = {"key": _partition_key(claim)}
    if (check_version and expected == document.checksum) or upload is None:
        outcome = execute_one(rt.engine, PUBLISH_SQL, {**params, "uploaded": False, "unlock": False})[0]
        if outcome != "upload":
            return _outcome(claim, outcome, expected), False
        if upload is None:
            return None
    with driver_autocommit(rt.engine) as connection:
        # The session-level lock and the call that drops it must use the same connection.
        connection.execute(SESSION_LOCK_SQL, lock)
        try:
            upload()
            row = connection.execute(PUBLISH_SQL, {**params, "uploaded": True, "unlock": True}).fetchone()
        except BaseException:
            _release(connection, lock)
            raise
    assert row is not None
    return _outcome(claim, row[0], expected), True


def _release(connection: psycopg.Connection[Any], lock: dict[str, str]) -> None:
    """Drop the session-level partition lock after a failed upload or publish; if that cannot be
    done, close the connection, which drops it too (the pool then replaces it: never hand a
    locked connection back)."""
    try:
        connection.execute(SESSION_UNLOCK_SQL, lock)
    except Exception:
        connection.close()


@dataclass(frozen=True, slots=True)
class Published:
    checksum: str
    size: int
    record_count: int
    uploaded: bool
    job_finished: bool


def current_version(rt: Runtime, company_id: int, resource: str, partition: str) -> str | None:
    """The storage key of a partition's current version, if it has one."""
    with rt.engine.connect() as conn:
        return conn.execute(select(DATASETS.c.storage_key).where(
            DATASETS.c.company_id == company_id, DATASETS.c.resource == resource,
            DATASETS.c.partition_key == partition,
        )).scalar_one_or_none()


def publish(
    rt: Runtime,
    claim: Claim,
    document: RenderedDocument,
    *,
    chunks: int,
    raw_records: RenderedDocument | None = None,
    bookmark: str | None = None,
    expected_checksum: str | None = None,
    check_version: bool = False,
    reader: Callable[[BinaryIO], BinaryIO] | None = None,
) -> Published:
    """Store ``document`` as the partition's current version and complete the task, atomically.

    Same checksum as the current version → no upload, only ``synced_at`` moves (invariant 5).
    Otherwise upload first, then ONE transaction: dataset pointer (+ incremental bookmark),
    task completed, job counters. On PostgreSQL a document up to ``INLINE_UPLOAD_BYTES`` is
    uploaded inside that transaction, under the partition's lock (still before the commit).
    ``raw_records`` (incremental resources) is stored beside the document so the next
    incremental sync can merge into it.

    ``check_version``: compare-and-swap — publish only if the partition's current checksum is
    still ``expected_checksum`` (``None``: no version), the one the attempt's lineage started
    from, or already equals this document's (defect 7). ``reader`` wraps the spooled files for
    the upload (the attempt's heartbeat).

    Raises:
        LeaseLost / TaskCancelled: the transaction is rolled back and nothing is published.
        VersionChanged: another task published the partition since the lineage started.
        StorageError: an upload failed; nothing was committed.
    """
    wrap = reader or (lambda file: file)
    checksum = document.checksum
    key = storage_key(claim.company_id, claim.resource, claim.partition, checksum)
    metadata = {"sha256": checksum, "record-count": str(document.record_count)}

    def upload() -> None:
        if raw_records is not None:
            rt.store.put(records_key(key), wrap(raw_records.open()), length=raw_records.size,
                         content_type="application/x-ndjson", metadata={"sha256": raw_records.checksum})
        # A document still in memory goes as bytes: one PUT body, no reads through the wrapper
        # (the attempt's lease keeper renews the lease meanwhile).
        body = document.read() if document.size <= SMALL_BODY_BYTES else wrap(document.open())
        rt.store.put(key, body, length=document.size, metadata=metadata)

    # A small document on PostgreSQL is uploaded under the partition's lock, inside the
    # publishing transaction: the collector cannot delete it before the pointer commits, which
    # saves a connection round for the pre-check and an S3 HEAD per publish. A large one is
    # uploaded before the lock is taken, so the transaction never waits on a long upload.
    postgres = rt.engine.dialect.name == "postgresql"
    inline = postgres and max(document.size, raw_records.size if raw_records is not None else 0) <= INLINE_UPLOAD_BYTES
    if postgres and (inline or (check_version and expected_checksum == checksum)):
        done = _publish_in_one_statement(rt, claim, document, key=key, chunks=chunks, bookmark=bookmark,
                                         expected=expected_checksum, check_version=check_version,
                                         upload=upload if inline else None)
        if done is not None:
            finished, uploaded = done
            metrics.published(claim.resource, records=document.record_count, size=document.size, uploaded=uploaded)
            return Published(checksum, document.size, document.record_count, uploaded, finished)
    where = (
        (DATASETS.c.company_id == claim.company_id)
        & (DATASETS.c.resource == claim.resource)
        & (DATASETS.c.partition_key == claim.partition)
    )
    uploaded = False
    if not inline:
        with rt.engine.connect() as conn:
            current = conn.execute(select(DATASETS.c.checksum_sha256).where(where)).scalar_one_or_none()
        if current != checksum:
            upload()
            uploaded = True
    now = utcnow()
    with rt.engine.begin() as conn:
        lock_partition(conn, claim.company_id, claim.resource, claim.partition)
        current = conn.execute(select(DATASETS.c.checksum_sha256).where(where)).scalar_one_or_none()
        if check_version and current not in (expected_checksum, checksum):
            raise VersionChanged(
                f"partition {claim.company_id}/{claim.resource}/{claim.partition} was published by another task "
                f"after this sync started (version {expected_checksum or 'none'} → {current}); starting over")
        pointer: Any
        if current == checksum:
            pointer = update(DATASETS).where(where).values(synced_at=now)
        else:
            if not uploaded or rt.store.stat(key) is None:
                upload()  # under the lock (small documents), or collected since our upload: upload again
                uploaded = True
            pointer = _upsert_dataset_statement(conn, {
                "company_id": claim.company_id, "resource": claim.resource, "partition_key": claim.partition,
                "storage_key": key, "checksum_sha256": checksum, "size_bytes": document.size,
                "record_count": document.record_count, "synced_at": now, "changed_at": now,
            })
        if bookmark is not None:
            _upsert_cursor(conn, claim, bookmark, now)
        if conn.dialect.name == "postgresql":
            # The pointer, the fenced task update and the job counters in one statement (one round trip).
            guarded = complete_task_guarded(conn, claim, pointer.returning(DATASETS.c.id).cte("pointer"),
                                            record_count=document.record_count, chunks=chunks)
            if guarded is None:
                fence_lost(conn, claim)  # raises; the transaction rolls back
            finished = guarded
        else:
            conn.execute(pointer)
            finished = complete_task(conn, claim, record_count=document.record_count, chunks=chunks)
    metrics.published(claim.resource, records=document.record_count, size=document.size, uploaded=uploaded)
    return Published(checksum, document.size, document.record_count, uploaded, finished)
