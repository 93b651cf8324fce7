"""Defects 13 and 14: messages that were lost are re-sent under a standing backlog, and a job
committed before its messages could be sent is answered normally (the sweeper sends them)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

import pika.exceptions
import pytest
from sqlalchemy import select, update

from pipeline.control import retry_job, submit_job
from pipeline.models import JOB_LOG, JOBS, TASKS, utcnow
from pipeline.runtime import Runtime
from pipeline.sweeper import sweep
from tests.fakes.scripted import Script, fixed
from tests.integration.test_protocol import add_scripted, job_log, plan, records

pytestmark = pytest.mark.usefixtures("scripted_connector")


class RecordingBroker:
    """A stand-in for RabbitMQ: records what is sent, reports a fixed backlog, can refuse."""

    def __init__(self, *, backlog: int = 0, refuse: bool = False) -> None:
        self.sent: list[int] = []
        self.coordinated: list[uuid.UUID] = []
        self._backlog = backlog
        self.refuse = refuse

    def enqueue(self, task_ids: Sequence[int], *, priority: str = "normal") -> None:
        if self.refuse:
            raise pika.exceptions.AMQPConnectionError("connection refused")
        self.sent.extend(task_ids)

    def coordinate(self, job_id: uuid.UUID, *, priority: str = "normal") -> None:
        if self.refuse:
            raise pika.exceptions.AMQPConnectionError("connection refused")
        self.coordinated.append(job_id)

    def backlog(self) -> int | None:
        return self._backlog


def test_a_lost_message_is_resent_under_a_standing_backlog_once_later_work_has_started(stack: Runtime) -> None:
    company = add_scripted(stack, Script(pages=fixed([records(0, 3)])), name="a")
    other = add_scripted(stack, Script(pages=fixed([records(0, 3)])), name="b")
    old_job, lost_task = plan(stack, company)
    new_job, started_task = plan(stack, other)
    hour_ago = utcnow() - timedelta(hours=1)
    with stack.engine.begin() as conn:  # the lost task was sent an hour ago; later work started since
        conn.execute(update(TASKS).where(TASKS.c.id == lost_task).values(updated_at=hour_ago))
        conn.execute(update(JOBS).where(JOBS.c.id == old_job).values(created_at=hour_ago))
        conn.execute(update(JOBS).where(JOBS.c.id == new_job).values(started_at=utcnow()))
        conn.execute(update(TASKS).where(TASKS.c.id == started_task).values(status="processing",
                                                                             lease_until=utcnow() + timedelta(hours=1)))
    broker = RecordingBroker(backlog=50_000)
    report = sweep(stack.engine, broker, pending_grace_s=300)
    assert broker.sent == [lost_task] and report.lost_messages == 1


def test_a_pending_task_is_not_resent_under_a_backlog_while_nothing_later_has_started(stack: Runtime) -> None:
    company = add_scripted(stack, Script(pages=fixed([records(0, 3)])))
    _, task = plan(stack, company)
    with stack.engine.begin() as conn:
        conn.execute(update(TASKS).where(TASKS.c.id == task).values(updated_at=utcnow() - timedelta(hours=1)))
    broker = RecordingBroker(backlog=50_000)
    assert sweep(stack.engine, broker, pending_grace_s=300).lost_messages == 0 and broker.sent == []


def test_a_sync_whose_messages_cannot_be_sent_is_still_accepted_and_logged_for_the_sweeper(stack: Runtime) -> None:
    company = add_scripted(stack, Script(pages=fixed([records(0, 3)])))
    broker = RecordingBroker(refuse=True)
    submitted = submit_job(stack.engine, broker, trigger="api", max_unfinished=3, company_ids=[company])
    with stack.engine.connect() as conn:
        messages = list(conn.execute(select(JOB_LOG.c.message).where(JOB_LOG.c.job_id == submitted.job_id)).scalars())
        status = conn.execute(select(JOBS.c.status).where(JOBS.c.id == submitted.job_id)).scalar_one()
    assert status == "pending" and any("the sweeper will send it" in m for m in messages)
    broker.refuse = False
    with stack.engine.begin() as conn:
        conn.execute(update(JOBS).where(JOBS.c.id == submitted.job_id)
                     .values(created_at=utcnow() - timedelta(minutes=10)))
    report = sweep(stack.engine, broker, pending_grace_s=300)
    assert report.unplanned_jobs == 1 and broker.coordinated == [submitted.job_id]


def test_a_retry_whose_messages_cannot_be_sent_is_still_answered_and_the_sweeper_sends_them(stack: Runtime) -> None:
    company = add_scripted(stack, Script(pages=fixed([records(0, 3)])))
    job_id, task_id = plan(stack, company)
    with stack.engine.begin() as conn:
        conn.execute(update(TASKS).values(status="failed", completed_at=utcnow()))
        conn.execute(update(JOBS).values(status="failed", failed_tasks=1, completed_at=utcnow()))
    broker = RecordingBroker(refuse=True)
    result = retry_job(stack.engine, broker, job_id=job_id, requested_by="test")
    assert result.retried_tasks == 1
    assert any("the sweeper will send them" in m for m in job_log(stack, job_id))
    broker.refuse = False
    with stack.engine.begin() as conn:
        conn.execute(update(TASKS).values(updated_at=utcnow() - timedelta(hours=1)))
    assert sweep(stack.engine, broker, pending_grace_s=300).lost_messages == 1
    assert broker.sent == [task_id]
