"""Issue 14's self-service and immediate mode on PostgreSQL, RabbitMQ and S3: a manager syncs
and watches only their own company; technicians cannot sync; another company's job answers
like a missing one; ``"immediate": true`` answers with the finished job, or 409 over the limit."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dramatiq
import httpx
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from actors.inprocess import running_worker
from actors.tasks import Actors
from pipeline.auth import issue_token
from pipeline.models import DATASETS, JOBS, TASKS
from pipeline.planning import coordinate_job
from pipeline.runtime import Runtime
from tests.integration.control_helpers import (
    ADMIN,
    add_synthetic,
    control_app,
    control_runtime,
    live_server,
    read_events,
    wait_job,
)
from tests.invariants import check_datasets, check_job_counters
from tests.services import S3Service


def bearer(rt: Runtime, company_id: int, role: str, employee_id: str | None = None) -> dict[str, str]:
    token = issue_token(rt.settings, company_id=company_id, role=role, employee_id=employee_id)
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def tenant_client(rt: Runtime, actors: Actors) -> Iterator[TestClient]:
    """A client without the admin key: only bearer tokens."""
    with TestClient(control_app(rt, actors)) as client:
        yield client


def task_companies(rt: Runtime, job_id: str) -> set[int]:
    with rt.engine.connect() as conn:
        return set(conn.execute(select(TASKS.c.company_id).where(TASKS.c.job_id == uuid.UUID(job_id))).scalars())


def count_jobs(rt: Runtime) -> int:
    with rt.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(JOBS)).scalar_one())


def test_a_managers_post_v1_sync_syncs_only_their_company_and_they_watch_it_on_v1_jobs(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, s3_service: S3Service, s3_bucket: str
) -> None:
    mine = add_synthetic(stack, "mine", days_ahead=2, jobs_per_day=3)
    theirs = add_synthetic(stack, "theirs", days_ahead=2, jobs_per_day=3)
    rt = control_runtime(stack)
    manager = bearer(rt, mine, "manager")
    with tenant_client(rt, actors) as client:
        answer = client.post("/v1/sync", json={"resources": ["schedule"]}, headers=manager)
        assert answer.status_code == 202, answer.text
        body = answer.json()
        job_id = body["job_id"]
        assert body["status_url"] == f"/v1/jobs/{job_id}" and body["events_url"] == f"/v1/jobs/{job_id}/events"
        assert body["status"] == "planning"  # the coordinator plans it
        wait_job(stack, job_id)
        job = client.get(body["status_url"], headers=manager).json()
        listed = client.get("/v1/jobs", headers=manager).json()
    assert task_companies(stack, job_id) == {mine}
    assert job["status"] == "completed" and job["progress"]["completed_tasks"] == 2
    assert job["progress"]["message"] == "completed: 2 of 2 tasks, 6 records"
    assert {task["company_id"] for task in job["tasks"]} == {mine}
    assert [entry["id"] for entry in listed] == [job_id]
    with stack.engine.connect() as conn:
        published = set(conn.execute(select(DATASETS.c.company_id)).scalars())
    assert published == {mine}, f"company {theirs} must not have been synced"
    assert check_job_counters(stack.engine, uuid.UUID(job_id)) == {"completed": 2}
    assert check_datasets(stack.engine, s3_service.client(), s3_bucket) == 2


def test_a_technician_gets_403_from_post_v1_sync_and_the_job_views_and_no_job_is_planned(
    stack: Runtime, actors: Actors
) -> None:
    company = add_synthetic(stack, "techs", days_ahead=1)
    rt = control_runtime(stack)
    technician = bearer(rt, company, "technician", "1001")
    with tenant_client(rt, actors) as client:
        answer = client.post("/v1/sync", json={}, headers=technician)
        anonymous = client.post("/v1/sync", json={})
        job_id = client.post("/sync", json={"company_ids": [company]}, headers=ADMIN).json()["job_id"]
        for path in ("/v1/jobs", f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events"):
            assert client.get(path, headers=technician).status_code == 403, path
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["code"] == "forbidden" and "technician" in answer.json()["error"]["message"]
    assert anonymous.status_code == 401
    assert count_jobs(stack) == 1, "only the admin's job"


def test_another_companys_job_answers_exactly_like_a_missing_one(stack: Runtime, actors: Actors) -> None:
    mine = add_synthetic(stack, "mine", days_ahead=1)
    theirs = add_synthetic(stack, "theirs", days_ahead=1)
    rt = control_runtime(stack)
    manager = bearer(rt, mine, "manager")
    with tenant_client(rt, actors) as client:
        other = client.post("/sync", json={"company_ids": [theirs]}, headers=ADMIN).json()["job_id"]
        missing = str(uuid.uuid4())
        for suffix in ("", "/events"):
            foreign = client.get(f"/v1/jobs/{other}{suffix}", headers=manager)
            absent = client.get(f"/v1/jobs/{missing}{suffix}", headers=manager)
            assert foreign.status_code == absent.status_code == 404
            assert foreign.content == absent.content
            assert foreign.headers["content-type"] == absent.headers["content-type"]
        assert client.get("/v1/jobs", headers=manager).json() == []
        assert client.get(f"/v1/jobs/{other}", headers=bearer(rt, theirs, "manager")).status_code == 200


def test_of_a_job_spanning_companies_a_manager_sees_only_their_tasks_counts_and_events(
    stack: Runtime, actors: Actors
) -> None:
    mine = add_synthetic(stack, "mine", days_ahead=1, jobs_per_day=4, page_size=2, chunk_delay_s=0.05)
    add_synthetic(stack, "theirs", days_ahead=2, jobs_per_day=6)
    rt = control_runtime(stack)
    manager = bearer(rt, mine, "manager")
    app = control_app(rt, actors)
    with TestClient(app) as client:
        job_id = client.post("/sync", json={}, headers=ADMIN).json()["job_id"]  # every company, like the hourly job
        # Until the coordinator plans it, a job for every company has no task of anyone's.
        assert client.get(f"/v1/jobs/{job_id}", headers=manager).status_code == 404
        assert coordinate_job(stack.engine, actors, uuid.UUID(job_id)) is not None  # what the coordinator does
        before = client.get(f"/v1/jobs/{job_id}", headers=manager).json()
    assert len(task_companies(stack, job_id)) == 2
    assert {task["company_id"] for task in before["tasks"]} == {mine}
    mine_tasks = len(before["tasks"])
    assert before["progress"]["total_tasks"] == mine_tasks and before["status"] == "pending"

    events: list[tuple[str, dict[str, Any]]] = []
    with live_server(app) as base, running_worker(actors.broker, threads=2):
        with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers=manager, timeout=60) as response:
            assert response.status_code == 200
            for event in read_events(response):
                events.append(event)
                if event[0] == "end":
                    break
        wait_job(stack, job_id)
        with tenant_client(rt, actors) as client:  # a new app: the old one's feed lives on uvicorn's loop
            after = client.get(f"/v1/jobs/{job_id}", headers=manager).json()
            listed = client.get("/v1/jobs", headers=manager).json()
    names = [name for name, _ in events]
    assert names[0] == "snapshot" and names[-1] == "end"
    assert {task["company_id"] for task in events[0][1]["tasks"]} == {mine}
    assert all(data["company_id"] == mine for name, data in events if name == "task")
    assert all(data["total_tasks"] == mine_tasks for name, data in events if name == "progress")
    end = events[-1][1]
    my_records = sum(task["record_count"] for task in after["tasks"])
    with stack.engine.connect() as conn:
        all_records = conn.execute(select(JOBS.c.processed_records).where(JOBS.c.id == uuid.UUID(job_id))).scalar()
    assert 0 < my_records < all_records
    assert end["status"] == "completed" and end["progress"]["total_tasks"] == mine_tasks
    assert end["progress"]["processed_records"] == my_records
    assert after["progress"]["completed_tasks"] == mine_tasks and after["progress"]["processed_records"] == my_records
    assert [(entry["id"], entry["progress"]["total_tasks"]) for entry in listed] == [(job_id, mine_tasks)]


def test_the_per_company_cap_answers_429_on_post_v1_sync(stack: Runtime, actors: Actors) -> None:
    company = add_synthetic(stack, "capped", days_ahead=1)
    rt = control_runtime(stack, max_unfinished_jobs=1)
    with tenant_client(rt, actors) as client:
        first = client.post("/v1/sync", json={}, headers=bearer(rt, company, "manager"))
        second = client.post("/v1/sync", json={}, headers=bearer(rt, company, "admin"))
    assert first.status_code == 202 and second.status_code == 429
    assert second.json()["error"]["code"] == "too_many_jobs"


# --- immediate mode ----------------------------------------------------------------------------


def test_immediate_v1_sync_of_one_company_answers_200_with_the_finished_job_and_no_worker_running(
    stack: Runtime, actors: Actors, s3_service: S3Service, s3_bucket: str
) -> None:
    company = add_synthetic(stack, "now", days_ahead=1, jobs_per_day=5, page_size=2)
    rt = control_runtime(stack)
    with tenant_client(rt, actors) as client:
        answer = client.post("/v1/sync", json={"immediate": True}, headers=bearer(rt, company, "manager"))
        assert answer.status_code == 200, answer.text
        job = answer.json()
        assert client.get(f"/v1/jobs/{job['id']}", headers=bearer(rt, company, "manager")).json() == job
    assert job["status"] == "completed" and job["progress"]["percent"] == 100
    assert {(t["status"], t["attempts"]) for t in job["tasks"]} == {("completed", 1)}
    schedule = [t for t in job["tasks"] if t["resource"] == "schedule"]
    assert schedule and all(t["chunks"] == 3 and t["record_count"] == 5 for t in schedule)
    assert check_job_counters(stack.engine, uuid.UUID(job["id"])) == {"completed": len(job["tasks"])}
    assert check_datasets(stack.engine, s3_service.client(), s3_bucket) == len(job["tasks"])


def test_immediate_post_sync_answers_the_finished_job_view_of_get_sync_jobs(stack: Runtime, actors: Actors) -> None:
    company = add_synthetic(stack, "now", days_ahead=1)
    rt = control_runtime(stack)
    with TestClient(control_app(rt, actors), headers=ADMIN) as client:
        answer = client.post("/sync", json={"company_ids": [company], "immediate": True})
        assert answer.status_code == 200, answer.text
        assert answer.json() == client.get(f"/sync/jobs/{answer.json()['id']}").json()
    assert answer.json()["status"] == "completed"


def test_immediate_over_the_task_limit_answers_409_naming_immediate_and_plans_nothing(
    stack: Runtime, actors: Actors
) -> None:
    company = add_synthetic(stack, "big", days_ahead=5)
    rt = control_runtime(stack, immediate_max_tasks=3)
    with TestClient(control_app(rt, actors), headers=ADMIN) as client:
        queued = client.post("/v1/sync", json={"immediate": True}, headers=bearer(rt, company, "manager"))
        admin = client.post("/sync", json={"immediate": True})
    for answer in (queued, admin):
        # A state conflict, not a malformed body: the same request is run with fewer tasks in scope.
        assert answer.status_code == 409, answer.text
        message = answer.json()["error"]["message"]
        assert message.startswith("immediate:") and "PIPELINE_IMMEDIATE_MAX_TASKS (3)" in message
    assert count_jobs(stack) == 0


def test_an_immediate_sync_out_of_time_answers_202_and_the_fleet_finishes_the_job(
    stack: Runtime, actors: Actors, s3_service: S3Service, s3_bucket: str
) -> None:
    company = add_synthetic(stack, "slow", days_ahead=1, jobs_per_day=10, page_size=2, chunk_delay_s=0.2)
    rt = control_runtime(stack, immediate_timeout_s=0.5)
    with tenant_client(rt, actors) as client:
        answer = client.post("/v1/sync", json={"immediate": True, "resources": ["schedule"]},
                             headers=bearer(rt, company, "manager"))
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    assert answer.json()["status"] == "processing"
    with running_worker(actors.broker, threads=2):
        wait_job(stack, job_id, timeout=120)
    assert check_job_counters(stack.engine, uuid.UUID(job_id)) == {"completed": 1}
    assert check_datasets(stack.engine, s3_service.client(), s3_bucket) == 1


def test_a_poisoned_partition_fails_with_code_upstream_malformed_in_the_job_view_and_its_events(
    stack: Runtime, actors: Actors
) -> None:
    company = add_synthetic(stack, "poisoned", days_ahead=1, jobs_per_day=2, poison_partitions=["all"])
    rt = control_runtime(stack)
    manager = bearer(rt, company, "manager")
    app = control_app(rt, actors)
    with TestClient(app) as client:
        job_id = client.post("/v1/sync", json={}, headers=manager).json()["job_id"]
    events: list[tuple[str, dict[str, Any]]] = []
    with live_server(app) as base, running_worker(actors.broker, threads=2):
        with httpx.stream("GET", f"{base}/sync/jobs/{job_id}/events", headers=ADMIN, timeout=60) as response:
            for event in read_events(response):
                events.append(event)
                if event[0] == "end":
                    break
    with tenant_client(rt, actors) as client:
        job = client.get(f"/v1/jobs/{job_id}", headers=manager).json()
    failed = [task for task in job["tasks"] if task["status"] == "failed"]
    assert [task["partition"] for task in failed] == ["all"]
    assert failed[0]["error"]["code"] == "upstream_malformed" and "record #0" in failed[0]["error"]["message"]
    assert job["error"] == {"code": "tasks_failed", "message": "1 of 2 tasks failed"}
    streamed = [data for name, data in events if name == "task" and data["status"] == "failed"]
    snapshot_failed = [t for t in events[0][1]["tasks"] if t["status"] == "failed"]
    assert [t["error"] for t in streamed or snapshot_failed] == [failed[0]["error"]]
    assert events[-1][1]["error"] == job["error"]
