"""Issue 5's acceptance on PostgreSQL, RabbitMQ and S3: POST /sync, progress with ETA, live
events, cancel, retry, the unfinished-jobs cap."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dramatiq
import httpx
import pytest
from sqlalchemy import Engine, event, select

from actors.inprocess import running_worker
from actors.tasks import Actors
from connectors.base import FetchRequest
from connectors.synthetic import SyntheticConnector
from connectors.transforms import get_transform
from pipeline.assembly import render_document
from pipeline.control import cancel_job
from pipeline.datasets import publish
from pipeline.errors import TaskCancelled
from pipeline.jobs import claim_task
from pipeline.models import DATASETS, JOBS, TASKS
from pipeline.planning import plan_job
from pipeline.runtime import Runtime
from tests.integration.control_helpers import (
    ADMIN,
    add_synthetic,
    control_app,
    control_client,
    control_runtime,
    live_server,
    read_events,
    wait_job,
)
from tests.invariants import check_datasets, check_job_counters
from tests.services import S3Service, wait_for

# What POST /sync may send (submit_job), whatever the scope's size: today 5 for named companies
# and resources (the submit lock, the unfinished jobs' scopes for the cap, the companies, their
# distinct connector configs for the resource check, the job row), one spare; never a task row.
MAX_SUBMIT_STATEMENTS = 6


@contextmanager
def sql_sent(engine: Engine) -> Iterator[list[str]]:
    """The statements ``engine`` sends inside the block, parameters left out (run it while no
    worker uses the engine)."""
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def task_statuses(rt: Runtime, job_id: str) -> list[str]:
    with rt.engine.connect() as conn:
        return list(conn.execute(select(TASKS.c.status).where(TASKS.c.job_id == uuid.UUID(job_id))).scalars())


def test_post_sync_answers_before_any_task_runs_and_progress_rises_to_100_with_an_eta(
    stack: Runtime, actors: Actors
) -> None:
    company = add_synthetic(stack, "slow", days_ahead=5, jobs_per_day=20, page_size=5, chunk_delay_s=0.03)
    with control_client(control_runtime(stack), actors) as client:
        with sql_sent(stack.engine) as sent:
            answer = client.post("/sync", json={"company_ids": [company], "resources": ["schedule"]})
        assert answer.status_code == 202, answer.text
        body = answer.json()
        assert body["status"] == "planning" and body["total_tasks"] == 0
        assert body["resource_types"] == ["schedule"]
        assert body["status_url"] == f"/sync/jobs/{body['job_id']}"
        assert body["events_url"] == f"/sync/jobs/{body['job_id']}/events"
        assert task_statuses(stack, body["job_id"]) == [], "the coordinator plans the tasks, after the answer"
        planning = client.get(body["status_url"]).json()
        assert planning["status"] == "planning" and planning["progress"]["percent"] == 0
        # Load-independent: the answer comes from a few statements that write no task (the coordinator
        # plans them later); test_coordinator proves they do not grow with the scope, bench/submit.py
        # times the answer (10,000 companies: ~11 ms).
        assert not [statement for statement in sent if "sync_tasks" in statement], sent
        assert len(sent) <= MAX_SUBMIT_STATEMENTS, [statement[:60] for statement in sent]

        samples: list[dict[str, Any]] = []

        def poll() -> bool:
            job = client.get(body["status_url"]).json()
            samples.append(job["progress"] | {"status": job["status"]})
            return bool(job["status"] in ("completed", "failed", "cancelled"))

        with running_worker(actors.broker, threads=2):
            wait_for(poll, timeout=60, what="the job to finish", interval=0.02)
    percents = [sample["percent"] for sample in samples]
    assert percents == sorted(percents), f"progress went backwards: {percents}"
    assert samples[-1]["status"] == "completed" and percents[-1] == 100
    mid_run = [s for s in samples if 0 < s["percent"] < 100]
    assert mid_run and all(s["eta_seconds"] is not None and s["eta_seconds"] > 0 for s in mid_run)
    assert samples[-1]["eta_seconds"] == 0
    assert samples[-1]["completed_tasks"] == 5 and samples[-1]["processed_records"] == 100


def test_sse_client_receives_every_task_transition_and_the_final_state_in_order(
    stack: Runtime, actors: Actors
) -> None:
    company = add_synthetic(stack, "watched", days_ahead=3, jobs_per_day=12, page_size=4, chunk_delay_s=0.02)
    app = control_app(control_runtime(stack), actors)
    events: list[tuple[str, dict[str, Any]]] = []
    snapshot_seen = threading.Event()
    with live_server(app) as base, httpx.Client(base_url=base, headers=ADMIN, timeout=30) as client:
        job_id = client.post("/sync", json={"company_ids": [company], "resources": ["schedule"]}).json()["job_id"]

        def listen() -> None:
            with client.stream("GET", f"/sync/jobs/{job_id}/events") as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                for event in read_events(response):
                    events.append(event)
                    snapshot_seen.set()

        listener = threading.Thread(target=listen)
        listener.start()
        assert snapshot_seen.wait(10), "no snapshot event"
        with running_worker(actors.broker, threads=2):
            listener.join(timeout=60)
        assert not listener.is_alive(), "the stream did not end with the job"

    names = [name for name, _ in events]
    assert names[0] == "snapshot" and names[-1] == "end"
    assert names.count("snapshot") == 1 and names.count("end") == 1
    snapshot, final = events[0][1], events[-1][1]
    assert snapshot["status"] == "planning" and snapshot["tasks"] == [], "tasks appear once the coordinator ran"
    assert final["status"] == "completed" and final["progress"]["percent"] == 100
    assert next(data["status"] for name, data in events if name == "progress") == "pending", "planned, then run"

    with stack.engine.connect() as conn:
        db_tasks = {row.id: row for row in conn.execute(select(TASKS).where(TASKS.c.job_id == uuid.UUID(job_id)))}
    per_task: dict[int, list[tuple[str, int]]] = {task_id: [] for task_id in db_tasks}
    done_counts = []
    for name, data in events[1:-1]:
        if name == "task":
            per_task[data["id"]].append((data["status"], data["chunks"]))
        elif name == "progress":
            done = data["completed_tasks"] + data["failed_tasks"] + data["cancelled_tasks"]
            done_counts.append(done)
            # Every task counted done has already been reported completed, in commit order.
            reported = sum(1 for steps in per_task.values() if steps and steps[-1][0] == "completed")
            assert reported >= done
    for task_id, steps in per_task.items():
        chunks_in_db = db_tasks[task_id].chunks
        # Every transition: claimed, one step per staged chunk, completed — nothing missing or repeated.
        assert steps == [("processing", n) for n in range(chunks_in_db + 1)] + [("completed", chunks_in_db)], steps
    assert done_counts == sorted(done_counts) and done_counts[-1] == 3


def test_cancel_mid_run_leaves_no_task_processing_and_nothing_half_published(
    stack: Runtime, actors: Actors, s3_service: S3Service, s3_bucket: str
) -> None:
    company = add_synthetic(stack, "to-cancel", days_ahead=3, jobs_per_day=40, page_size=5, chunk_delay_s=0.05)
    with control_client(control_runtime(stack), actors) as client:
        job_id = client.post("/sync", json={"company_ids": [company], "resources": ["schedule"]}).json()["job_id"]
        jid = uuid.UUID(job_id)
        with running_worker(actors.broker, threads=2) as worker:

            def chunking() -> bool:
                with stack.engine.connect() as conn:
                    return conn.execute(select(TASKS.c.id).where(
                        TASKS.c.job_id == jid, TASKS.c.status == "processing", TASKS.c.chunks >= 1)).first() is not None

            wait_for(chunking, timeout=30, what="a task to stage a chunk")
            answer = client.post(f"/sync/jobs/{job_id}/cancel")
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "cancelled" and answer.json()["cancelled_tasks"] == 3
            assert set(task_statuses(stack, job_id)) == {"cancelled"}
            for queue in actors.queues:
                actors.broker.join(queue, timeout=30_000)
            worker.join()
        assert client.post(f"/sync/jobs/{job_id}/cancel").status_code == 409
        job = client.get(f"/sync/jobs/{job_id}").json()
        logs = client.get(f"/sync/jobs/{job_id}/logs").json()
    assert job["status"] == "cancelled" and job["progress"]["cancelled_tasks"] == 3
    assert check_job_counters(stack.engine, jid) == {"cancelled": 3}
    with stack.engine.connect() as conn:
        assert conn.execute(select(DATASETS)).all() == [], "a cancelled task published nothing"
    assert check_datasets(stack.engine, s3_service.client(), s3_bucket) == 0
    assert any(entry["message"].startswith("cancelled by api: 3 open task(s)") for entry in logs)


def test_cancel_between_upload_and_commit_rolls_the_publish_back(
    stack: Runtime, actors: Actors, s3_service: S3Service, s3_bucket: str
) -> None:
    company = add_synthetic(stack, "racy", days_ahead=1, jobs_per_day=3)
    planned = plan_job(stack.engine, None, trigger="api", company_ids=[company], resources=["schedule"])
    assert planned is not None
    claim = claim_task(stack.engine, planned.task_ids[0], lease_s=60)
    assert claim is not None
    chunk = SyntheticConnector({"jobs_per_day": 3}).fetch(FetchRequest(
        company_id=company, external_id=None, resource="schedule", partition=claim.partition))
    document = render_document(get_transform("schedule"), company, "schedule", claim.partition,
                               lambda: chunk.records)
    cancel_job(stack.engine, job_id=planned.job_id, requested_by="test")
    with pytest.raises(TaskCancelled):
        publish(stack, claim, document, chunks=1)
    with stack.engine.connect() as conn:
        assert conn.execute(select(DATASETS)).all() == []
    assert check_job_counters(stack.engine, planned.job_id) == {"cancelled": 1}
    assert check_datasets(stack.engine, s3_service.client(), s3_bucket) == 0


def test_retry_completes_the_previously_failed_tasks(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, s3_service: S3Service, s3_bucket: str
) -> None:
    company = add_synthetic(stack, "flaky", days_ahead=2, jobs_per_day=4, fail_attempts=50)
    with control_client(control_runtime(stack), actors) as client:
        job_id = client.post("/sync", json={"company_ids": [company]}).json()["job_id"]
        wait_job(stack, job_id)
        failed = client.get(f"/sync/jobs/{job_id}").json()
        assert failed["status"] == "failed" and failed["progress"]["failed_tasks"] == 3
        assert all("injected failure" in task["error"]["message"] for task in failed["tasks"])
        assert {task["error"]["code"] for task in failed["tasks"]} == {"upstream_unavailable"}
        assert failed["error"] == {"code": "tasks_failed", "message": "3 of 3 tasks failed"}
        assert client.post(f"/sync/jobs/{job_id}/cancel").status_code == 409

        fixed = client.patch(f"/companies/{company}", json={"config": {"days_ahead": 2, "jobs_per_day": 4}})
        assert fixed.status_code == 200 and "fail_attempts" not in fixed.json()["config"]
        retried = client.post(f"/sync/jobs/{job_id}/retry")
        assert retried.status_code == 202, retried.text
        assert retried.json() == {"job_id": job_id, "status": "processing", "retried_tasks": 3, "priority": "high"}
        wait_job(stack, job_id)
        done = client.get(f"/sync/jobs/{job_id}").json()
        logs = client.get(f"/sync/jobs/{job_id}/logs").json()
        assert client.post(f"/sync/jobs/{job_id}/retry").status_code == 409, "nothing left to retry"
    assert done["status"] == "completed" and done["error"] is None
    assert {(task["status"], task["attempts"], task["error"]) for task in done["tasks"]} == {("completed", 1, None)}
    assert check_job_counters(stack.engine, uuid.UUID(job_id)) == {"completed": 3}
    assert check_datasets(stack.engine, s3_service.client(), s3_bucket) == 3
    messages = [entry["message"] for entry in logs]
    assert sum("injected failure" in message for message in messages) == 3 * stack.settings.max_attempts
    assert any(message.startswith("retried by api: 3 failed and 0 cancelled") for message in messages)
    assert [entry["id"] for entry in logs] == sorted(entry["id"] for entry in logs)


@pytest.mark.settings(max_unfinished_jobs=2)
def test_a_company_at_the_unfinished_jobs_cap_gets_429(stack: Runtime, actors: Actors) -> None:
    first = add_synthetic(stack, "busy", days_ahead=1)
    second = add_synthetic(stack, "idle", days_ahead=1)
    with control_client(control_runtime(stack), actors) as client:
        with sql_sent(stack.engine) as first_sent:
            jobs = [client.post("/sync", json={"company_ids": [first]})]
        jobs.append(client.post("/sync", json={"company_ids": [first]}))
        assert [job.status_code for job in jobs] == [202, 202]
        refused = client.post("/sync", json={"company_ids": [first]})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_jobs"
        assert f"company {first} has 2" in refused.json()["error"]["message"]
        assert client.post("/sync", json={"company_ids": [second, first]}).status_code == 429
        assert client.post("/sync", json={}).status_code == 429, "an all-company job includes the busy one"

        # Load-independent: another company at the cap does not make this one's check do more work;
        # each accepted POST /sync sends the same statements as the first one did (bench/submit.py times it).
        for _ in range(2):
            with sql_sent(stack.engine) as sent:
                other = client.post("/sync", json={"company_ids": [second]})
            assert other.status_code == 202
            assert sent == first_sent, (first_sent, sent)
        assert client.post("/sync", json={"company_ids": [second]}).status_code == 429

        client.post(f"/sync/jobs/{jobs[0].json()['job_id']}/cancel")
        assert client.post("/sync", json={"company_ids": [first]}).status_code == 202

        listed = client.get("/sync/jobs", params={"company_id": first}).json()
        assert len(listed) == 3 and {job["status"] for job in listed} == {"planning", "cancelled"}
        pending = client.get("/sync/jobs", params={"company_id": second, "status": "pending"}).json()
        assert len(pending) == 2


def test_admin_key_is_required_on_the_real_stack(stack: Runtime, actors: Actors) -> None:
    with control_client(control_runtime(stack), actors) as client:
        for headers in ({"X-API-Key": ""}, {"X-API-Key": "wrong"}):
            answer = client.post("/sync", json={}, headers=headers)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthorized"
    with stack.engine.connect() as conn:
        assert conn.execute(select(JOBS)).all() == [], "a refused request plans nothing"
