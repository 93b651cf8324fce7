"""The services going away mid-run: RabbitMQ restarted, PostgreSQL restarted, blob storage cut off.

RabbitMQ and PostgreSQL are this machine's shared servers (the suite runs serially); blob
storage is cut at a TCP proxy between the workers and the S3 server, so no object is lost with it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import select

from pipeline.models import JOBS
from tests.reliability.harness import (
    SIZES,
    TINY,
    Harness,
    Size,
    start_postgres,
    start_rabbitmq,
    stop_postgres,
    stop_rabbitmq,
)
from tests.services import postgres_answers


def outage_s(size: Size, *, ci: float, soak: float) -> float:
    return soak if size.name == "soak" else ci


@pytest.mark.parametrize("size", SIZES)
def test_rabbitmq_restart_mid_run_loses_no_task_and_no_publish(make_harness: Any, size: Size) -> None:
    h: Harness = make_harness(size)
    late = h.add_companies(10, TINY, name="late")
    early = h.add_companies(size.companies - len(late), TINY)
    h.start_workers()
    h.start_sweeper()
    # The first job leaves the late companies out: a plan skips a partition with an open task, and
    # the stranded job must own every one of its partitions.
    job = h.plan(company_ids=early)
    h.wait_for_done(job.job_id, at_least=job.total_tasks // 4)

    stop_rabbitmq()
    try:
        # A job planned while the broker is down: its tasks are committed, its messages never sent.
        with pytest.raises(Exception):  # noqa: B017 - whatever the client raises, the plan is in Postgres
            h.plan(company_ids=late)
        time.sleep(outage_s(size, ci=2, soak=15))
    finally:
        start_rabbitmq()
    with h.engine.connect() as conn:
        [stranded] = conn.execute(select(JOBS.c.id).where(JOBS.c.id != job.job_id)).scalars()

    reports = h.finish(job.job_id, stranded)

    assert reports[0].states == {"completed": job.total_tasks}
    assert reports[1].states == {"completed": len(late) * size.partitions}
    assert h.sweeper is not None and h.sweeper.resent >= len(late) * size.partitions


@pytest.mark.parametrize("size", SIZES)
def test_postgres_restart_mid_run_loses_and_doubles_nothing(make_harness: Any, size: Size) -> None:
    h: Harness = make_harness(size)
    h.add_companies(size.companies, TINY)
    h.start_workers()
    h.start_sweeper()
    job = h.plan()
    h.wait_for_done(job.job_id, at_least=job.total_tasks // 4)

    stop_postgres()
    try:
        time.sleep(outage_s(size, ci=2, soak=15))
    finally:
        start_postgres(lambda: postgres_answers(h.worker_settings.database_url))

    [report] = h.finish(job.job_id)
    assert report.states == {"completed": job.total_tasks}


@pytest.mark.parametrize("size", SIZES)
def test_blob_storage_unreachable_mid_run_delays_but_fails_nothing(make_harness: Any, size: Size) -> None:
    # Workers stay up: a long lease keeps a slow machine from adding claims the outage did not cause.
    h: Harness = make_harness(size, lease_s=60.0)
    h.add_companies(size.companies, TINY)
    h.start_workers()
    h.start_sweeper()
    job = h.plan()
    h.wait_for_done(job.job_id, at_least=job.total_tasks * 3 // 4)

    h.proxy.cut()
    try:
        time.sleep(outage_s(size, ci=8, soak=30))
        during = h.progress(job.job_id)
    finally:
        h.proxy.restore()

    [report] = h.finish(job.job_id)
    assert during.failed_tasks == 0
    assert report.states == {"completed": job.total_tasks}
    # Tasks did hit the outage, and it cost them no attempt.
    assert any("blob storage unavailable" in entry.message for entry in h.job_log(job.job_id))
    assert report.max_attempts == 1
