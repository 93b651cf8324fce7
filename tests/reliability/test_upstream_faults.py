"""The upstream misbehaving: bursts of 429 and 500, and a partition that is poison every time."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from pipeline.models import TASKS, utcnow
from tests.fakes.graphql_api import GraphQLApi
from tests.fakes.upstreams import FakeUpstream, ScheduleApi
from tests.reliability.harness import SIZES, TINY, Harness, Size, rest_schedule_config


class Bursts:
    """Queues a burst of 429s (with Retry-After) and 500s on the fake every ``every`` requests."""

    def __init__(self, api: FakeUpstream, *, every: int, rate_limited: int, errors: int, bursts: int) -> None:
        self.api = api
        self.every = every
        self.rate_limited = rate_limited
        self.errors = errors
        self.bursts = bursts
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Bursts:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while self.sent < self.bursts and not self._stop.wait(0.05):
            if len(self.api.requests) >= (self.sent + 1) * self.every:
                self.api.fail_next("rate_limit", self.rate_limited, retry_after=0.2)
                self.api.fail_next("server_error", self.errors)
                self.sent += 1


@pytest.mark.parametrize("size", SIZES)
def test_bursts_of_429_and_500_from_the_upstream_end_with_every_task_completed(
    make_harness: Any, size: Size
) -> None:
    with ScheduleApi(3, users=2) as api:
        h: Harness = make_harness(size)
        h.add_companies(size.companies, rest_schedule_config(api, page_size=100, days_ahead=size.days_ahead),
                        connector="rest", expect={"jobs_per_day": 3, "employees": 2})
        h.start_workers()
        h.start_sweeper()
        bursts = size.tasks // 100  # spread over the first half of the run's requests
        with Bursts(api, every=50, rate_limited=5, errors=4, bursts=bursts) as injected:
            job = h.plan()
            [report] = h.finish(job.job_id)

    assert injected.sent == bursts
    statuses = Counter(request.status for request in api.requests)
    assert statuses[429] >= 5 * bursts and statuses[500] >= 4 * bursts, statuses
    assert report.states == {"completed": job.total_tasks}


def graphql_schedule_config(api: GraphQLApi, *, days_ahead: int) -> dict[str, Any]:
    """The GraphQL fake's jobs as a ``graphql`` resource ``jobs``: two pages per partition."""
    query = ("query($first: Int!, $after: String, $day: String!) { jobs(first: $first, after: $after, day: $day)"
             " { nodes { id title updatedAt } pageInfo { hasNextPage endCursor } } }")
    return {
        "endpoint": f"{api.base_url}/graphql", "pages_per_chunk": 1,
        "retry": {"max_attempts": 6, "backoff_s": 0.05, "max_backoff_s": 0.5},
        "resources": {"jobs": {
            "query": query, "variables": {"day": "{partition}"}, "records": "data.jobs.nodes",
            "partitions": {"type": "daily", "days_ahead": days_ahead}, "primary_key": "id",
            "paginator": {"type": "relay", "page_info": "data.jobs.pageInfo", "first": 2},
        }},
    }


@pytest.mark.parametrize("size", SIZES)
def test_bursts_of_429_500_and_throttled_errors_end_with_every_graphql_task_completed(
    make_harness: Any, size: Size
) -> None:
    with GraphQLApi(3) as api:
        h: Harness = make_harness(size)
        h.add_companies(size.companies, graphql_schedule_config(api, days_ahead=size.days_ahead),
                        connector="graphql")
        h.start_workers()
        h.start_sweeper()
        bursts = size.tasks // 100
        with Bursts(api, every=50, rate_limited=5, errors=4, bursts=bursts) as injected:
            api.fail_next("throttled", 2)  # 200s with a THROTTLED error: retried like 429s
            job = h.plan()
            [report] = h.finish(job.job_id, expected_records=lambda task: api.count)

    assert injected.sent == bursts
    statuses = Counter(request.status for request in api.requests)
    assert statuses[429] >= 5 * bursts and statuses[500] >= 4 * bursts, statuses
    assert report.states == {"completed": job.total_tasks}


@pytest.mark.parametrize("size", SIZES)
def test_poison_partitions_fail_with_a_readable_error_and_block_nothing(make_harness: Any, size: Size) -> None:
    h: Harness = make_harness(size)
    today = utcnow().date()
    poison_day, flaky_day = (today + timedelta(days=2)).isoformat(), (today + timedelta(days=4)).isoformat()
    # Malformed records on every attempt (not retryable), and a partition whose upstream fails every time.
    [poisoned] = h.add_companies(1, {**TINY, "poison_partitions": [poison_day]}, name="poisoned")
    [flaky] = h.add_companies(1, {**TINY, "fail_attempts": 1000, "fail_partitions": [flaky_day]}, name="flaky")
    h.add_companies(size.companies - 2, TINY)
    h.start_workers()
    h.start_sweeper()
    job = h.plan(today=today)

    def deliberate(task: Any) -> bool:
        return (task.company_id, task.partition_key) in {(poisoned, poison_day), (flaky, flaky_day)}

    [report] = h.finish(job.job_id, expected_failed=deliberate)

    assert report.states == {"completed": job.total_tasks - 2, "failed": 2}
    progress = h.progress(job.job_id)
    assert progress.status == "failed" and progress.error == f"2 of {job.total_tasks} tasks failed"
    with h.engine.connect() as conn:
        failed = {row.company_id: row for row in conn.execute(select(TASKS).where(TASKS.c.status == "failed"))}
    assert failed[poisoned].attempts == 1, "a malformed page is not retried"
    assert "has no primary key 'JobInformationId'" in failed[poisoned].error_message
    assert failed[flaky].attempts == h.rt.settings.max_attempts
    assert "synthetic upstream unavailable" in failed[flaky].error_message
