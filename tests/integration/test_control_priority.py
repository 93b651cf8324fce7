"""Priorities: a person's sync runs ahead of the scheduled batch (issue 5, item 6)."""

from __future__ import annotations

from actors.inprocess import running_worker
from actors.tasks import Actors
from pipeline.control import cancel_job
from pipeline.planning import plan_job
from pipeline.progress import job_progress
from pipeline.runtime import Runtime
from tests.integration.control_helpers import add_synthetic, control_client, control_runtime
from tests.services import wait_for

BATCH_COMPANIES = 20
DAYS = 249  # + the "users" partition: 250 tasks per company, 5,000 in all


def test_a_high_priority_job_submitted_behind_5000_queued_tasks_finishes_before_them(
    stack: Runtime, actors: Actors
) -> None:
    companies = [add_synthetic(stack, f"batch {index}", days_ahead=DAYS, jobs_per_day=1, employees=1, teams=1)
                 for index in range(BATCH_COMPANIES)]
    person = add_synthetic(stack, "person", days_ahead=3, jobs_per_day=5)
    batch = plan_job(stack.engine, actors, trigger="schedule", company_ids=companies)
    assert batch is not None and batch.priority == "normal" and batch.total_tasks == 5000

    with control_client(control_runtime(stack), actors) as client, running_worker(actors.broker, threads=2):
        wait_for(lambda: job_progress(stack.engine, batch.job_id).completed_tasks >= 4, timeout=30,
                 what="the worker to be busy with the batch")
        answer = client.post("/sync", json={"company_ids": [person]})
        assert answer.status_code == 202
        high = answer.json()["job_id"]
        wait_for(lambda: client.get(f"/sync/jobs/{high}").json()["status"] == "completed", timeout=30,
                 what="the high-priority job to finish")
        batch_done = job_progress(stack.engine, batch.job_id).done_tasks
        cancel_job(stack.engine, job_id=batch.job_id, requested_by="test")  # let the worker skip the rest
    assert batch_done < 100, f"{batch_done} batch tasks ran before the high-priority job finished"
