"""``pipeline_publish``: the publishing transaction as ONE statement (issue 13).

Revision ID: 0007_publish_function
Revises: 0006
Create Date: 2026-12-02

PostgreSQL only (SQLite keeps the multi-statement path in ``pipeline.datasets``). The function
does, in the one transaction of the statement that calls it, what ``pipeline.datasets.publish``
did in a BEGIN, four statements and a COMMIT:

1. take the partition's transaction-scoped advisory lock (the one the garbage collector decides
   and deletes under); when ``p_unlock``, release the session-level lock on the same key the
   caller took before uploading (the transaction-scoped one now holds the partition to commit);
2. read the partition's current checksum and compare-and-swap: with ``p_check_version``, the
   current version must still be ``p_expected`` (the lineage's base) or this very document —
   else ``changed:<current checksum>`` and nothing is written;
3. a document not yet current that the caller has not uploaded (``p_uploaded`` false): answer
   ``upload`` and write nothing (the caller uploads under the lock and calls again);
4. the fenced task update (``lease_token`` and ``status = 'processing'``): if it matches
   nothing, ``lost:<task status>`` and nothing is written;
5. the dataset pointer (only ``synced_at`` when the checksum is unchanged: invariant 5), the
   incremental bookmark if any, the job's counters, and the job's end when this was its last task.

It answers ``published`` or ``finished`` (this call finished the job). Its writes fire the same
coalesced-notification triggers as before (revision 0004): one event per transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007_publish_function"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PUBLISH_FUNCTION = """
CREATE OR REPLACE FUNCTION pipeline_publish(
    p_task_id bigint, p_token text, p_company_id bigint, p_resource text, p_partition text,
    p_check_version boolean, p_expected text, p_checksum text, p_storage_key text, p_size bigint,
    p_record_count integer, p_chunks integer, p_bookmark text, p_now timestamptz,
    p_uploaded boolean, p_unlock boolean
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    lock_key bigint := hashtextextended(p_company_id::text || '/' || p_resource || '/' || p_partition, 0);
    current_checksum text;
    task_job uuid;
    task_status text;
    job record;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    IF p_unlock THEN
        PERFORM pg_advisory_unlock(lock_key);
    END IF;
    SELECT checksum_sha256 INTO current_checksum FROM datasets
     WHERE company_id = p_company_id AND resource = p_resource AND partition_key = p_partition;
    IF p_check_version AND current_checksum IS DISTINCT FROM p_expected
       AND current_checksum IS DISTINCT FROM p_checksum THEN
        RETURN 'changed:' || coalesce(current_checksum, '');
    END IF;
    IF current_checksum IS DISTINCT FROM p_checksum AND NOT p_uploaded THEN
        RETURN 'upload';
    END IF;
    UPDATE sync_tasks
       SET status = 'completed', lease_until = NULL, lease_token = NULL, record_count = p_record_count,
           chunks = p_chunks, error_message = NULL, error_code = NULL, updated_at = p_now, completed_at = p_now
     WHERE id = p_task_id AND lease_token = p_token AND status = 'processing'
    RETURNING job_id INTO task_job;
    IF NOT FOUND THEN
        SELECT status INTO task_status FROM sync_tasks WHERE id = p_task_id;
        RETURN 'lost:' || coalesce(task_status, '');
    END IF;
    IF current_checksum IS NOT DISTINCT FROM p_checksum THEN
        UPDATE datasets SET synced_at = p_now
         WHERE company_id = p_company_id AND resource = p_resource AND partition_key = p_partition;
    ELSE
        INSERT INTO datasets (company_id, resource, partition_key, storage_key, checksum_sha256, size_bytes,
                              record_count, synced_at, changed_at)
        VALUES (p_company_id, p_resource, p_partition, p_storage_key, p_checksum, p_size, p_record_count,
                p_now, p_now)
        ON CONFLICT (company_id, resource, partition_key) DO UPDATE
           SET storage_key = EXCLUDED.storage_key, checksum_sha256 = EXCLUDED.checksum_sha256,
               size_bytes = EXCLUDED.size_bytes, record_count = EXCLUDED.record_count,
               synced_at = EXCLUDED.synced_at, changed_at = EXCLUDED.changed_at;
    END IF;
    IF p_bookmark IS NOT NULL THEN
        INSERT INTO sync_cursors (company_id, resource, partition_key, bookmark, updated_at)
        VALUES (p_company_id, p_resource, p_partition, p_bookmark, p_now)
        ON CONFLICT (company_id, resource, partition_key) DO UPDATE
           SET bookmark = EXCLUDED.bookmark, updated_at = EXCLUDED.updated_at;
    END IF;
    UPDATE sync_jobs
       SET completed_tasks = completed_tasks + 1, processed_records = processed_records + p_record_count
     WHERE id = task_job
    RETURNING total_tasks, completed_tasks, failed_tasks, cancelled_tasks, status INTO job;
    IF job.completed_tasks + job.failed_tasks + job.cancelled_tasks < job.total_tasks
       OR job.status IN ('completed', 'failed', 'cancelled') THEN
        RETURN 'published';
    END IF;
    UPDATE sync_jobs
       SET status = CASE WHEN job.failed_tasks > 0 THEN 'failed'
                         WHEN job.cancelled_tasks > 0 THEN 'cancelled' ELSE 'completed' END,
           completed_at = p_now,
           error_message = CASE WHEN job.failed_tasks > 0
                                THEN job.failed_tasks || ' of ' || job.total_tasks || ' tasks failed' END,
           started_at = coalesce(started_at, p_now)
     WHERE id = task_job;
    RETURN 'finished';
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PUBLISH_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS pipeline_publish(bigint, text, bigint, text, text, boolean, text, text, "
                   "text, bigint, integer, integer, text, timestamptz, boolean, boolean)")
