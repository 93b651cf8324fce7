"""One checker for DESIGN.md's invariants, shared by integration and reliability tests."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
import pika
import pika.exceptions
from minio import Minio
from sqlalchemy import Engine, select

from connectors.transforms import DOCUMENT_ROWS
from pipeline.cleanup import remove_finished_staging
from pipeline.datasets import STAGING_PREFIX
from pipeline.models import Dataset, SyncJob, SyncTask
from storage.base import BlobStore


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


def check_datasets(engine: Engine, client: Minio, bucket: str, *, readers: int = 1) -> int:
    """Every dataset row's object exists, its bytes (read with the minio SDK) hash to its
    checksum, and its document has no duplicate rows. Returns the number of rows checked.

    ``readers`` > 1 reads that many objects at a time (thousands of rows in the reliability suite).
    """
    with engine.connect() as conn:
        rows = conn.execute(select(Dataset.__table__)).all()

    def check(row: Any) -> None:
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

    if readers > 1:
        with ThreadPoolExecutor(readers) as pool:
            list(pool.map(check, rows))
    else:
        for row in rows:
            check(row)
    return len(rows)


# --- the whole set, for the reliability suite ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvariantReport:
    """What ``check_invariants`` looked at: enough for a test to assert on and a report to print."""

    states: dict[str, int]
    datasets: int
    staging_removed: int
    queues: dict[str, int]
    max_attempts: int
    retried_tasks: int


def _passive_counts(amqp_url: str, queues: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for queue in queues:
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel = connection.channel()
                try:
                    declared = channel.queue_declare(name, passive=True)
                except pika.exceptions.ChannelClosedByBroker as exc:
                    if exc.reply_code != 404:
                        raise
                    counts[name] = 0  # never declared: nothing was ever queued there
                    continue
                counts[name] = int(declared.method.message_count)
                channel.close()
    finally:
        connection.close()
    return counts


def queue_depths(amqp_url: str, queues: Iterable[str]) -> dict[str, int]:
    """Ready messages in each queue and in its delay (.DQ) and dead-letter (.XQ) queue."""
    return _passive_counts(amqp_url, queues)


def delete_queues(amqp_url: str, queues: Iterable[str]) -> None:
    """Delete each queue with its .DQ and .XQ twins (a missing one is fine)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for queue in queues:
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel.queue_delete(name)
    finally:
        connection.close()


def check_queues_empty(amqp_url: str, queues: Iterable[str]) -> dict[str, int]:
    """No message left in the queues, their delay queues or their dead-letter queues.

    Run it once no consumer holds messages (workers stopped): unacknowledged messages go back
    to their queue when a consumer's connection closes, so they are counted too.
    """
    counts = queue_depths(amqp_url, queues)
    assert not any(counts.values()), f"messages left on the broker: {counts}"
    return counts


def check_no_stranded_tasks(engine: Engine) -> None:
    """No task of any job is left pending or processing."""
    with engine.connect() as conn:
        stranded = conn.execute(
            select(SyncTask.id, SyncTask.status, SyncTask.job_id)
            .where(SyncTask.status.in_(("pending", "processing"))).limit(20)
        ).all()
    assert not stranded, f"stranded tasks: {[tuple(row) for row in stranded]}"


def check_no_staging_leftovers(engine: Engine, store: BlobStore) -> int:
    """After ``remove_finished_staging``, no staging part is left. Returns how many it removed."""
    removed = remove_finished_staging(engine, store)
    left = [info.key for info in store.list(f"{STAGING_PREFIX}/")]
    assert not left, f"staging parts left after cleanup: {left[:20]}"
    return removed


def check_task_results(
    engine: Engine,
    job_id: uuid.UUID,
    *,
    expected_failed: Callable[[Any], bool] = lambda task: False,
    expected_records: Callable[[Any], int] | None = None,
) -> dict[str, int]:
    """Every task of the job completed once with its dataset row, or failed on purpose.

    ``expected_failed(task)`` says which tasks a test made fail (a deliberate upstream error):
    those must be failed with a readable error and must not have published anything; every
    other task must be completed, with a ``datasets`` row whose record count is the task's
    (and ``expected_records(task)`` when given).
    """
    with engine.connect() as conn:
        tasks = conn.execute(select(SyncTask.__table__).where(SyncTask.job_id == job_id)).all()
        rows = {
            (row.company_id, row.resource, row.partition_key): row
            for row in conn.execute(select(Dataset.__table__))
        }
    wrong: list[str] = []
    for task in tasks:
        key = (task.company_id, task.resource, task.partition_key)
        if expected_failed(task):
            if task.status != "failed" or not (task.error_message or "").strip():
                wrong.append(f"task {task.id} {key} should have failed with an error: {task.status}")
            elif key in rows:
                wrong.append(f"task {task.id} {key} failed but a dataset row points at a version")
            continue
        if task.status != "completed":
            wrong.append(f"task {task.id} {key} is {task.status}: {task.error_message}")
            continue
        row = rows.get(key)
        if row is None:
            wrong.append(f"task {task.id} {key} completed without a dataset row")
        elif row.record_count != task.record_count:
            wrong.append(f"task {task.id} {key}: {task.record_count} records, dataset row {row.record_count}")
        elif expected_records is not None and task.record_count != expected_records(task):
            wrong.append(f"task {task.id} {key}: {task.record_count} records, expected {expected_records(task)}")
    assert not wrong, f"{len(wrong)} wrong task result(s): {wrong[:10]}"
    return dict(Counter(task.status for task in tasks))


def check_invariants(
    engine: Engine,
    job_id: uuid.UUID,
    *,
    client: Minio,
    bucket: str,
    store: BlobStore,
    amqp_url: str,
    queues: Iterable[str],
    expected_failed: Callable[[Any], bool] = lambda task: False,
    expected_records: Callable[[Any], int] | None = None,
) -> InvariantReport:
    """DESIGN.md's invariants after a run, all at once (the reliability suite's one checker).

    Call it when the job is finished and the workers are stopped:

    - the job's counters equal its tasks' states, and no task anywhere is pending or processing;
    - every task completed exactly once with a matching dataset row, or failed on purpose;
    - every dataset row's object exists and hashes to its checksum, with no duplicate records;
    - no staging part is left after ``remove_finished_staging``;
    - the queues, delay queues and dead-letter queues are empty.
    """
    queue_names = list(queues)
    states = check_job_counters(engine, job_id)
    check_no_stranded_tasks(engine)
    check_task_results(engine, job_id, expected_failed=expected_failed, expected_records=expected_records)
    datasets = check_datasets(engine, client, bucket, readers=4)
    removed = check_no_staging_leftovers(engine, store)
    counts = check_queues_empty(amqp_url, queue_names)
    with engine.connect() as conn:
        attempts = list(conn.execute(select(SyncTask.attempts).where(SyncTask.job_id == job_id)).scalars())
    return InvariantReport(
        states=states, datasets=datasets, staging_removed=removed, queues=counts,
        max_attempts=max(attempts, default=0), retried_tasks=sum(1 for a in attempts if a > 1),
    )
