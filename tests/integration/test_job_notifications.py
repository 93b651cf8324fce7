"""``job_events`` notifications (migration 0004): one per transaction and task, job changes folded in.

Every NOTIFY-issuing commit takes PostgreSQL's global notify lock; these tests listen on the
channel while a real job runs and count what each committed transaction sent.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from typing import Any

import dramatiq
import orjson
import psycopg

from actors.tasks import Actors
from pipeline.control import cancel_job
from pipeline.events import CHANNEL, conninfo_of
from pipeline.planning import plan_job
from pipeline.progress import job_progress
from pipeline.runtime import Runtime
from tests.integration.control_helpers import add_synthetic
from tests.services import wait_for


def collected(conn: psycopg.Connection[Any], job_id: uuid.UUID) -> list[dict[str, Any]]:
    """Every notification about ``job_id`` received so far (waits a second for stragglers)."""
    found = []
    for notify in conn.notifies(timeout=1.0):
        payload = orjson.loads(notify.payload)
        if payload["job_id"] == str(job_id):
            found.append(payload)
    return found


def test_every_transaction_sends_one_notification_and_a_publish_carries_its_task_in_the_job_change(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker
) -> None:
    # 3 days of 4 jobs, 2 records a page: two chunks per partition, so chunk steps are notified too.
    add_synthetic(stack, "a", days_ahead=3, jobs_per_day=4, page_size=2)
    with psycopg.connect(conninfo_of(stack.engine), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        job = plan_job(stack.engine, actors, trigger="cli", resources=["schedule"])
        assert job is not None and job.total_tasks == 3
        wait_for(lambda: job_progress(stack.engine, job.job_id).finished, timeout=60, what="the job")
        notes = collected(listener, job.job_id)

    per_transaction = Counter(note["xid"] for note in notes)
    doubled = [(n["kind"], n.get("task_id"), n.get("status"), n.get("task")) for n in notes
               if per_transaction[n["xid"]] > 1]
    assert notes and set(per_transaction.values()) == {1}, f"a transaction sent several: {doubled}"
    completions = [note for note in notes if note["kind"] == "job" and note.get("task", {}).get("status")
                   == "completed"]
    assert sorted(note["task"]["task_id"] for note in completions) == sorted(job.task_ids), \
        "each publish is one job notification carrying its completed task"
    assert [note["completed_tasks"] for note in completions] == [1, 2, 3]
    steps: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for note in notes:
        task = note if note["kind"] == "task" else note.get("task")
        if task is not None:
            steps[task["task_id"]].append((task["status"], task["chunks"]))
    for task_id, seen in steps.items():
        assert seen[0] == ("processing", 0) and seen[-1][0] == "completed", (task_id, seen)


def test_cancelling_many_tasks_sends_one_event_per_task_and_one_for_the_job(stack: Runtime) -> None:
    add_synthetic(stack, "a", days_ahead=20)
    job = plan_job(stack.engine, None, trigger="cli", resources=["schedule"])  # never sent: all pending
    assert job is not None and job.total_tasks == 20
    with psycopg.connect(conninfo_of(stack.engine), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        cancel_job(stack.engine, job_id=job.job_id)
        notes = collected(listener, job.job_id)
    tasks = [note["task_id"] for note in notes if note["kind"] == "task"]
    tasks += [note["task"]["task_id"] for note in notes if note["kind"] == "job" and "task" in note]
    assert sorted(tasks) == sorted(job.task_ids), "one event per task transition, none repeated"
    jobs = [note for note in notes if note["kind"] == "job"]
    assert len(jobs) == 1 and jobs[0]["status"] == "cancelled" and jobs[0]["cancelled_tasks"] == 20
