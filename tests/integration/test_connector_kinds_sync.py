"""GraphQL, OAuth2 and list-then-detail upstreams through the whole worker path."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import dramatiq
import pytest
from sqlalchemy import func, select

from actors.tasks import Actors
from pipeline.models import COMPANIES, OAUTH_TOKENS, Dataset, JobLog, SyncTask
from pipeline.planning import plan_job
from pipeline.progress import job_progress
from pipeline.runtime import Runtime
from tests.fakes.graphql_api import GraphQLApi
from tests.fakes.oauth2 import OAuth2Provider
from tests.fakes.upstreams import ScheduleApi
from tests.fakes.videos import VideoApi
from tests.integration.conftest import WorkerFleet, add_rest_company
from tests.integration.test_rest_sync import document_of, run_job
from tests.invariants import check_datasets, check_job_counters
from tests.services import S3Service, wait_for

JOBS_QUERY = (
    "query($first: Int!, $after: String, $day: String!) { jobs(first: $first, after: $after, day: $day) {"
    " nodes { id title updatedAt } pageInfo { hasNextPage endCursor } } }"
)
ITEMS_QUERY = "query($skip: Int!, $first: Int!) { items(skip: $skip, first: $first) { id name } }"
GRAPHQL: dict[str, dict[str, Any]] = {
    "relay": {"query": JOBS_QUERY, "variables": {"day": "{partition}"}, "records": "data.jobs.nodes",
              "partitions": {"type": "daily", "days_ahead": 1},
              "paginator": {"type": "relay", "page_info": "data.jobs.pageInfo", "first": 3}, "primary_key": "id"},
    "offset": {"query": ITEMS_QUERY, "records": "data.items", "primary_key": "id",
               "paginator": {"type": "offset", "offset_variable": "skip", "limit_variable": "first", "limit": 3}},
}


def graphql_config(api: GraphQLApi, resource: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"endpoint": f"{api.base_url}/graphql", "pages_per_chunk": 2, "resources": {"things": resource}, **extra}


def pages_asked(api: GraphQLApi) -> Counter[str]:
    return Counter(repr(sorted(entry.json()["variables"].items())) for entry in api.requests)


@pytest.mark.parametrize("paginator", GRAPHQL)
@pytest.mark.settings(task_time_budget_s=0.001)  # every chunk is its own message
def test_every_graphql_paginator_publishes_every_record_once_across_continuation_messages(
    paginator: str, stack: Runtime, actors: Actors, worker: dramatiq.Worker, graphql_api: GraphQLApi,
    s3_service: S3Service, s3_bucket: str,
) -> None:
    company = add_rest_company(stack, name="g", connector="graphql",
                          config=graphql_config(graphql_api, GRAPHQL[paginator])).id
    job = run_job(stack, actors)

    assert check_job_counters(stack.engine, job.job_id) == {"completed": 1}
    with stack.engine.connect() as conn:
        task = conn.execute(select(SyncTask.__table__)).one()
        continuations = conn.execute(select(func.count()).where(JobLog.message.like("continuation%"))).scalar_one()
    expected = graphql_api.jobs_of(task.partition_key) if paginator == "relay" else graphql_api.records()
    records = document_of(stack, company, "things")["records"]
    assert [r["id"] for r in records] == sorted(r["id"] for r in expected)
    assert all(count == 1 for count in pages_asked(graphql_api).values()), "a page was fetched twice"
    assert task.chunks >= 4 and continuations == task.chunks - 1 and task.attempts == 1
    check_datasets(stack.engine, s3_service.client(), s3_bucket)


def test_a_graphql_errors_response_fails_the_task_with_its_message_and_publishes_nothing(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, graphql_api: GraphQLApi,
    s3_service: S3Service, s3_bucket: str,
) -> None:
    add_rest_company(stack, name="g", connector="graphql", config=graphql_config(graphql_api, GRAPHQL["relay"]))
    graphql_api.fail_next("graphql_errors", message="Cannot query jobs of a suspended account", after=3)
    job = run_job(stack, actors)

    assert check_job_counters(stack.engine, job.job_id) == {"failed": 1}
    with stack.engine.connect() as conn:
        task = conn.execute(select(SyncTask.__table__)).one()
        datasets = conn.execute(select(func.count()).select_from(Dataset)).scalar_one()
    assert "Cannot query jobs of a suspended account" in (task.error_message or "")
    assert task.attempts == 1, "an errors response is permanent"
    assert datasets == 0
    objects = list(s3_service.client().list_objects(s3_bucket, recursive=True))
    assert [o.object_name for o in objects if not o.object_name.startswith("_staging/")] == []
    check_datasets(stack.engine, s3_service.client(), s3_bucket)


@pytest.mark.settings(task_time_budget_s=0.001)
def test_list_then_detail_publishes_every_detail_record_once_with_ceil_ids_over_50_batches(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, s3_service: S3Service, s3_bucket: str,
) -> None:
    with VideoApi(230) as api:
        config = {
            "base_url": api.base_url, "pages_per_chunk": 4,
            "resources": {"videos": {
                "path": "/youtube/v3/search", "params": {"part": "id", "maxResults": 120}, "records": "items",
                "paginator": {"type": "cursor", "cursor_param": "pageToken", "cursor_path": "nextPageToken"},
                "primary_key": "id",
                "details": {"path": "/youtube/v3/videos", "ids_param": "id", "batch": 50, "records": "items",
                            "join": "id", "list_id": "id.videoId"},
            }},
        }
        company = add_rest_company(stack, name="v", connector="rest", config=config).id
        job = run_job(stack, actors)

        assert check_job_counters(stack.engine, job.job_id) == {"completed": 1}
        records = document_of(stack, company, "videos")["records"]
        assert sorted(r["id"] for r in records) == [v["id"] for v in api.records()]
        assert len(records) == len({r["id"] for r in records}) == 230
        assert all("statistics" in r for r in records), "the detail records are published, not the listing"
        searches = sum(1 for e in api.requests if e.path == "/youtube/v3/search")
        assert searches == 2 and len(api.details_requests()) == math.ceil(120 / 50) + math.ceil(110 / 50)
        with stack.engine.connect() as conn:
            assert conn.execute(select(SyncTask.chunks)).scalar_one() == 2, "4 requests per page fill a chunk"
    check_datasets(stack.engine, s3_service.client(), s3_bucket)


PARTITIONS = 20


def test_rotating_refresh_tokens_under_load_two_processes_four_threads(
    stack: Runtime, actors: Actors, worker_fleet: WorkerFleet, schedule_api: ScheduleApi,
    oauth_provider: OAuth2Provider, s3_service: S3Service, s3_bucket: str,
) -> None:
    oauth_provider.register_client("pipeline", "client-secret")
    oauth_provider.uses_per_token = 25
    schedule_api.require_oauth(oauth_provider)
    config = {
        "base_url": schedule_api.base_url, "pages_per_chunk": 3,
        "auth": {"type": "oauth2_refresh_token", "token_url": oauth_provider.token_url, "client_id": "pipeline",
                 "client_secret": "client-secret", "refresh_token": oauth_provider.issue_grant("pipeline")},
        "resources": {"schedule": {
            "path": "/api/dr-schedule", "params": {"startDate": "{partition}", "endDate": "{partition}"},
            "partitions": {"type": "daily", "days_ahead": PARTITIONS}, "records": "Result",
            "envelope": {"success": "IsSuccess", "message": "Message"}, "primary_key": "JobInformationId",
            "paginator": {"type": "page", "size": 2}, "transform": "schedule",
        }},
    }
    company = add_rest_company(stack, name="oauth", connector="rest", config=config).id
    worker_fleet.start(threads=4)
    worker_fleet.start(threads=4)
    job = plan_job(stack.engine, actors, trigger="cli")
    assert job is not None
    wait_for(lambda: job_progress(stack.engine, job.job_id).finished, timeout=240, what="the OAuth2 job")

    with stack.engine.connect() as conn:
        errors = conn.execute(select(SyncTask.error_message).where(SyncTask.status != "completed")).scalars().all()
    assert errors == []
    assert check_job_counters(stack.engine, job.job_id) == {"completed": PARTITIONS}
    assert not oauth_provider.revoked(), "the grant was revoked: a spent refresh token was presented"
    assert oauth_provider.revocations == 0
    served = sum(1 for entry in schedule_api.requests if entry.status == 200)
    assert served >= PARTITIONS * 13
    assert oauth_provider.expiries >= served // 25 - 1
    assert oauth_provider.refreshes == oauth_provider.expiries + 1, (
        f"{oauth_provider.refreshes} refreshes for {oauth_provider.expiries} expiries: a refresh stampede"
    )
    with stack.engine.connect() as conn:
        row = conn.execute(select(OAUTH_TOKENS).where(OAUTH_TOKENS.c.company_id == company)).one()
    assert row.refreshes == oauth_provider.refreshes and row.revoked_reason is None
    assert oauth_provider.current_refresh_token() not in repr(row._mapping)
    with stack.engine.connect() as conn:
        stored = repr(conn.execute(select(COMPANIES.c.connector_config).where(COMPANIES.c.id == company)).scalar_one())
    assert "client-secret" not in stored and config["auth"]["refresh_token"] not in stored, "secrets sealed at rest"
    check_datasets(stack.engine, s3_service.client(), s3_bucket)


def test_invalid_grant_fails_every_task_of_the_company_with_upstream_auth_and_asks_once(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, schedule_api: ScheduleApi,
    oauth_provider: OAuth2Provider,
) -> None:
    oauth_provider.register_client("pipeline", "client-secret")
    schedule_api.require_oauth(oauth_provider)
    config = {
        "base_url": schedule_api.base_url,
        "auth": {"type": "oauth2_refresh_token", "token_url": oauth_provider.token_url, "client_id": "pipeline",
                 "client_secret": "client-secret", "refresh_token": "rt_revoked_by_the_user"},
        "resources": {"schedule": {
            "path": "/api/dr-schedule", "params": {"startDate": "{partition}", "endDate": "{partition}"},
            "partitions": {"type": "daily", "days_ahead": 3}, "records": "Result", "primary_key": "JobInformationId",
            "transform": "schedule",
        }},
    }
    add_rest_company(stack, name="revoked", connector="rest", config=config)
    job = run_job(stack, actors)

    assert check_job_counters(stack.engine, job.job_id) == {"failed": 3}
    with stack.engine.connect() as conn:
        tasks = conn.execute(select(SyncTask.error_message, SyncTask.attempts)).all()
    assert all(message.startswith("upstream_auth: ") and "must be re-authorized" in message
               for message, _ in tasks), tasks
    assert all(attempts == 1 for _, attempts in tasks), "invalid_grant is permanent"
    assert len(oauth_provider.requests) == 1, "the refused grant was presented once, not once per task"
    assert schedule_api.requests == []
