"""Worker database connections dropped mid-run (what a PostgreSQL restart does to them), without
restarting the shared server: ``pg_terminate_backend`` on every backend of the test's database.

Workers run without ``pool_pre_ping``, so the first statement on each dropped connection fails.
That failure is an outage of the database, not the task's: it must spend no attempt and must
not count towards the retries after which Dramatiq dead-letters a message.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, OperationalError

from actors.broker import retry_policy
from pipeline.db import make_engine
from pipeline.errors import FailureKind
from pipeline.execution import RetryTask, database_failure, is_outage, run_task
from pipeline.models import JOB_LOG
from pipeline.runtime import Runtime
from tests.reliability.harness import TINY, Harness, Size
from tests.services import wait_for

# Few tasks, each slowed by the link to blob storage, so that every worker thread is in the
# middle of an attempt (between its claim and its publish) when its connection is dropped.
SIZE = Size("disconnects", companies=6, workers=2, threads=2)
# Bytes per second from the workers to the S3 server: each request takes a few tenths of a second.
SLOW_LINK = 4_000

_TERMINATE = text(
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
)


def _terminate_worker_backends(h: Harness) -> int:
    with h.engine.connect() as conn:
        killed = int(conn.execute(_TERMINATE).scalar_one())
        conn.commit()
    return killed


def test_dropped_worker_connections_spend_no_attempt_and_dead_letter_nothing(make_harness: Any) -> None:
    # One attempt per task: a dropped connection taken for the task's own failure fails it for good.
    h: Harness = make_harness(SIZE, max_attempts=1)
    h.add_companies(SIZE.companies, TINY)
    h.proxy.upload_bytes_per_s = SLOW_LINK
    h.start_workers()
    h.start_sweeper()
    job = h.plan()
    # Drop the connections twice: once early, once after the pools reconnected.
    for at_least in (1, job.total_tasks // 2):
        h.wait_for_done(job.job_id, at_least=at_least)
        wait_for(lambda: _terminate_worker_backends(h) > 0, timeout=30, what="a worker backend to terminate")
    h.proxy.upload_bytes_per_s = None

    [report] = h.finish(job.job_id)
    assert report.states == {"completed": job.total_tasks}
    with h.engine.connect() as conn:
        refused = conn.execute(select(JOB_LOG.c.message).where(
            JOB_LOG.c.job_id == job.job_id, JOB_LOG.c.message.contains("refused a statement"))).scalars().all()
    assert refused == [], "a dropped connection was taken for a statement the database refused"


def test_a_connection_that_could_not_be_opened_is_an_outage_even_once_the_database_answers_again(
    make_harness: Any,
) -> None:
    h: Harness = make_harness(SIZE)
    nowhere = make_engine("postgresql://postgres@127.0.0.1:1/none", pool_pre_ping=False)
    try:
        with pytest.raises(OperationalError) as refused, nowhere.connect():
            pass
    finally:
        nowhere.dispose()
    # h.rt's database answers SELECT 1 now; the statement still never ran.
    assert database_failure(h.rt, refused.value).kind is FailureKind.OUTAGE
    with pytest.raises(DBAPIError) as divided, h.engine.connect() as conn:
        conn.execute(text("SELECT 1 / 0"))
    assert database_failure(h.rt, divided.value).kind is FailureKind.RETRYABLE, "a refused statement spends an attempt"


def test_a_claim_that_cannot_connect_is_retried_as_an_outage_not_dead_lettered(make_harness: Any) -> None:
    # The claim runs on the pool's raw psycopg connection (pipeline.db.driver_autocommit), whose
    # connect error is the driver's own: left unwrapped it escaped every classification, and after
    # a PostgreSQL restart 282 messages were dead-lettered once their few ordinary retries ran out.
    h: Harness = make_harness(SIZE)
    unreachable = h.worker_settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/none"})
    rt = Runtime.from_settings(unreachable, pre_ping=False)
    try:
        with pytest.raises(RetryTask) as retried:
            run_task(rt, 1)
    finally:
        rt.close()
    assert retried.value.kind is FailureKind.OUTAGE and is_outage(retried.value), retried.value
    give_up_after = retry_policy(5, max_outage_retries=1000)
    assert give_up_after(50, retried.value), "an outage is retried past the ordinary retry count"
