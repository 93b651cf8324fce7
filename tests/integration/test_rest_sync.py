"""REST upstreams through the whole worker path: chunks, continuations, failures, crashes, increments."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import dramatiq
import orjson
import pytest
from sqlalchemy import select

from actors.tasks import Actors
from pipeline.models import Dataset, JobLog, SyncTask
from pipeline.planning import plan_job
from pipeline.progress import job_progress
from pipeline.runtime import Runtime
from pipeline.sweeper import sweep
from tests.fakes.upstreams import CloseApi, FakeUpstream, LinkApi, ScheduleApi, StripeApi
from tests.integration.conftest import WorkerFleet, add_rest_company
from tests.invariants import check_datasets, check_job_counters
from tests.services import S3Service, wait_for

DAY = "2026-11-23"

ENVELOPE = {"records": "Result", "envelope": {"success": "IsSuccess", "message": "Message"}}


def schedule_config(api: ScheduleApi, *, size: int = 4, pages_per_chunk: int = 2) -> dict[str, Any]:
    return {
        "base_url": api.base_url, "pages_per_chunk": pages_per_chunk,
        "resources": {"schedule": {
            "path": "/api/dr-schedule", "params": {"startDate": "{partition}", "endDate": "{partition}"},
            "partitions": {"type": "daily", "days_ahead": 1}, **ENVELOPE, "primary_key": "JobInformationId",
            "paginator": {"type": "page", "page_param": "page", "size_param": "pageSize", "size": size},
            "transform": "schedule",
        }},
    }


def list_config(api: FakeUpstream, resource: dict[str, Any], *, pages_per_chunk: int = 2) -> dict[str, Any]:
    return {"base_url": api.base_url, "pages_per_chunk": pages_per_chunk,
            "resources": {"items": {"transform": "identity", **resource}}}


PAGINATED: dict[str, tuple[str, dict[str, Any]]] = {
    "stripe cursor": ("stripe_api", {"path": "/v1/customers", "records": "data", "primary_key": "id", "paginator": {
        "type": "cursor", "cursor_param": "starting_after", "cursor_path": None, "has_more": "has_more",
        "limit_param": "limit", "limit": 3}}),
    "close offset": ("close_api", {"path": "/api/v1/lead/", "records": "data", "primary_key": "id", "paginator": {
        "type": "offset", "offset_param": "_skip", "limit_param": "_limit", "limit": 3, "has_more": "has_more"}}),
    "link header": ("link_api", {"path": "/items", "params": {"per_page": 3}, "primary_key": "id",
                                 "paginator": {"type": "link"}}),
}


def run_job(rt: Runtime, actors: Actors, **scope: Any) -> Any:
    job = plan_job(rt.engine, actors, trigger="cli", **scope)
    assert job is not None
    wait_for(lambda: job_progress(rt.engine, job.job_id).finished, timeout=90, what="the job to finish")
    return job


def document_of(rt: Runtime, company_id: int, resource: str) -> dict[str, Any]:
    with rt.engine.connect() as conn:
        key = conn.execute(select(Dataset.storage_key).where(Dataset.company_id == company_id,
                                                             Dataset.resource == resource)).scalar_one()
    return orjson.loads(rt.store.get(key))  # type: ignore[no-any-return]


def pages_requested(api: FakeUpstream) -> Counter[tuple[str, tuple[tuple[str, str], ...]]]:
    return Counter((entry.path, tuple(sorted(entry.params.items()))) for entry in api.requests)


@pytest.mark.parametrize("fixture, resource", PAGINATED.values(), ids=PAGINATED.keys())
@pytest.mark.settings(task_time_budget_s=0.001)  # hands the task off after every chunk: each chunk is a message
def test_every_paginator_publishes_every_record_once_across_continuation_messages(
    fixture: str, resource: dict[str, Any], request: pytest.FixtureRequest, stack: Runtime, actors: Actors,
    worker: dramatiq.Worker, s3_service: S3Service, s3_bucket: str,
) -> None:
    api: FakeUpstream = request.getfixturevalue(fixture)
    company = add_rest_company(stack, name="c", connector="rest", config=list_config(api, resource)).id
    job = run_job(stack, actors)
    assert check_job_counters(stack.engine, job.job_id) == {"completed": 1}
    records = document_of(stack, company, "items")["records"]
    assert [r["id"] for r in records] == sorted(r["id"] for r in api.records())  # type: ignore[attr-defined]
    assert all(count == 1 for count in pages_requested(api).values()), "a page was fetched twice"
    with stack.engine.connect() as conn:
        task = conn.execute(select(SyncTask.__table__)).one()
        continuations = conn.execute(select(JobLog.message).where(JobLog.message.like("continuation%"))).all()
    assert task.chunks >= 4 and len(continuations) == task.chunks - 1
    assert task.attempts == 1, "continuations are not attempts"
    check_datasets(stack.engine, s3_service.client(), s3_bucket)


def test_upstream_failures_fail_only_their_task_with_the_reason(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, schedule_api: ScheduleApi
) -> None:
    schedule_api.require_header("Authorization", "Bearer right")
    base = schedule_config(schedule_api)
    unauthorized = add_rest_company(stack, name="no auth", connector="rest", config=base).id
    os.environ["CONNECTOR_TEST_UPSTREAM_TOKEN"] = "right"  # the worker runs in this process
    good = add_rest_company(stack, name="good", connector="rest",
                       config={**base, "auth": {"type": "bearer", "token_env": "CONNECTOR_TEST_UPSTREAM_TOKEN"}}).id
    job = run_job(stack, actors)
    states = check_job_counters(stack.engine, job.job_id)
    assert states == {"completed": 1, "failed": 1}
    with stack.engine.connect() as conn:
        rows = {r.company_id: r for r in conn.execute(select(SyncTask.__table__)).all()}
    assert rows[unauthorized].status == "failed" and "401" in rows[unauthorized].error_message
    assert rows[unauthorized].attempts == 1, "a 401 is not retried"
    assert rows[good].status == "completed" and rows[good].record_count == 25
    assert "right" not in rows[unauthorized].error_message


def test_not_success_envelope_and_malformed_pages_name_the_problem(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, schedule_api: ScheduleApi
) -> None:
    company = add_rest_company(stack, name="c", connector="rest", config=schedule_config(schedule_api, size=50)).id
    schedule_api.fail_next("not_success", 1, message="Company is suspended")
    run_job(stack, actors)
    schedule_api.fail_next("malformed", 1, variant="not_list")
    run_job(stack, actors)
    with stack.engine.connect() as conn:
        errors = conn.execute(select(SyncTask.error_message).where(SyncTask.company_id == company)
                              .order_by(SyncTask.id)).scalars().all()
    assert "Company is suspended" in (errors[0] or "")
    assert "Result" in (errors[1] or "") and "list" in (errors[1] or "")


def test_rate_limited_and_flaky_upstream_still_completes(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, schedule_api: ScheduleApi
) -> None:
    config = schedule_config(schedule_api, size=5)
    config["retry"] = {"max_attempts": 5, "backoff_s": 0.05, "max_backoff_s": 0.2, "max_wait_s": 10}
    add_rest_company(stack, name="c", connector="rest", config=config)
    schedule_api.fail_next("rate_limit", 2, retry_after=1)
    schedule_api.fail_next("server_error", 2)
    job = run_job(stack, actors)
    assert check_job_counters(stack.engine, job.job_id) == {"completed": 1}
    statuses = [entry.status for entry in schedule_api.requests]
    assert statuses[:4] == [429, 429, 500, 500] and set(statuses[4:]) == {200}
    gap = schedule_api.requests[1].at - schedule_api.requests[0].at
    assert gap >= 0.95, "Retry-After honoured"


def test_incremental_sync_asks_only_for_changes_and_equals_a_full_sync(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, close_api: CloseApi
) -> None:
    resource = {"path": "/api/v1/lead/", "records": "data", "primary_key": "id",
                "incremental": {"param": "updated_since", "field": "updated_at"},
                "paginator": {"type": "offset", "offset_param": "_skip", "limit_param": "_limit", "limit": 10,
                              "has_more": "has_more"}}
    incremental = add_rest_company(stack, name="inc", connector="rest", config=list_config(close_api, resource)).id
    full = add_rest_company(stack, name="full", connector="rest", config=list_config(close_api, resource)).id
    run_job(stack, actors, company_ids=[incremental], mode="incremental")  # no bookmark yet: everything
    changed_ids = [r["id"] for r in close_api.records()[3:6]]
    updated_at = close_api.touch(changed_ids, display_name="renamed")
    close_api.clear_requests()
    run_job(stack, actors, company_ids=[incremental], mode="incremental")
    asked = [entry.params.get("updated_since") for entry in close_api.requests]
    assert asked and all(value is not None for value in asked), "the second sync asks only for changes"
    assert sum(1 for entry in close_api.requests) == 1, "three changed records fit one page"
    run_job(stack, actors, company_ids=[full], mode="full")
    merged, fresh = document_of(stack, incremental, "items"), document_of(stack, full, "items")
    assert merged["records"] == fresh["records"]
    assert sum(1 for r in merged["records"] if r.get("display_name") == "renamed") == 3
    assert max(r["updated_at"] for r in merged["records"]) == updated_at


def test_sigkill_mid_task_repeats_at_most_one_chunk_of_requests(
    stack: Runtime, actors: Actors, worker_fleet: WorkerFleet, stripe_api: StripeApi, s3_service: S3Service,
    s3_bucket: str,
) -> None:
    stripe_api.reset(count=600)
    worker_fleet.settings = stack.settings.model_copy(update={"lease_s": 2.0})
    resource = dict(PAGINATED["stripe cursor"][1])
    resource["paginator"] = {**resource["paginator"], "limit": 5}
    company = add_rest_company(stack, name="big", connector="rest",
                          config=list_config(stripe_api, resource, pages_per_chunk=2)).id
    first = worker_fleet.start(threads=1)
    job = plan_job(stack.engine, actors, trigger="cli")
    assert job is not None

    def chunks() -> int:
        with stack.engine.connect() as conn:
            return int(conn.execute(select(SyncTask.chunks)).scalar_one())

    wait_for(lambda: chunks() >= 5, timeout=60, what="five staged chunks")
    worker_fleet.kill(first)
    worker_fleet.start(threads=1)

    def swept() -> bool:
        sweep(stack.engine, actors, pending_grace_s=1)
        return job_progress(stack.engine, job.job_id).finished

    wait_for(swept, timeout=120, what="the task to resume and complete", interval=0.5)
    assert check_job_counters(stack.engine, job.job_id) == {"completed": 1}
    records = document_of(stack, company, "items")["records"]
    assert len(records) == 600 == len({r["id"] for r in records})
    repeated = sum(count - 1 for count in pages_requested(stripe_api).values())
    assert repeated <= 2, f"{repeated} pages fetched again; one chunk is 2 pages"
    check_datasets(stack.engine, s3_service.client(), s3_bucket)


def test_two_worker_processes_never_exceed_the_upstream_rate_limit(
    stack: Runtime, actors: Actors, worker_fleet: WorkerFleet, link_api: LinkApi
) -> None:
    link_api.reset(count=60)
    resource = {"path": "/items", "params": {"per_page": 3}, "primary_key": "id", "paginator": {"type": "link"}}
    config = {**list_config(link_api, resource, pages_per_chunk=50), "rate_limit": {"requests_per_second": 5}}
    for index in range(2):
        add_rest_company(stack, name=f"c{index}", connector="rest", config=config)
    worker_fleet.start(threads=1)
    worker_fleet.start(threads=1)
    job = plan_job(stack.engine, actors, trigger="cli")
    assert job is not None
    wait_for(lambda: job_progress(stack.engine, job.job_id).finished, timeout=90, what="the rate-limited job")
    assert check_job_counters(stack.engine, job.job_id) == {"completed": 2}
    # The limit is on send times (connectors.rest.ratelimit): measured when the requests' bytes
    # reached the kernel, not when the fake's threads got round to them on a loaded machine.
    stamps = sorted(entry.sent_at for entry in link_api.requests if entry.sent_at is not None)
    assert len(stamps) == len(link_api.requests) == 40  # 60 records, 3 per page, two companies
    for index, stamp in enumerate(stamps):
        in_window = sum(1 for other in stamps[index:] if other - stamp < 1.0)
        assert in_window <= 5, f"{in_window} requests sent within one second starting at {stamp}"


@pytest.mark.settings(task_time_budget_s=0.001)
def test_page_paginator_publishes_the_whole_schedule_across_continuation_messages(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, schedule_api: ScheduleApi
) -> None:
    company = add_rest_company(stack, name="c", connector="rest", config=schedule_config(schedule_api)).id
    job = run_job(stack, actors)
    assert check_job_counters(stack.engine, job.job_id) == {"completed": 1}
    with stack.engine.connect() as conn:
        partition = conn.execute(select(SyncTask.partition_key)).scalar_one()
        chunks = conn.execute(select(SyncTask.chunks)).scalar_one()
    jobs = document_of(stack, company, "schedule")["jobs"]
    assert [j["id"] for j in jobs] == sorted(j["JobInformationId"] for j in schedule_api.jobs(partition))
    assert chunks == 7, "25 jobs, 4 per page; a spent budget cuts each chunk to one page"
    assert all(count == 1 for count in pages_requested(schedule_api).values()), "a page was fetched twice"
