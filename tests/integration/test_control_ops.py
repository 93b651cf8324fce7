"""Operations on the real stack: cleanup, metrics (API and worker fleet), the monitoring SQL of
docs/monitoring.md, the job feed behind ``pipeline sync --wait``, and the jobs CLI."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import dramatiq
import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text, update

from actors.inprocess import running_worker
from actors.middleware import WorkerMetrics
from actors.tasks import Actors
from pipeline.auth import issue_token
from pipeline.cleanup import cleanup
from pipeline.companies import update_company
from pipeline.events import follow_job
from pipeline.models import DATASETS, JOBS, TASKS, utcnow
from pipeline.planning import plan_job
from pipeline.progress import job_progress
from pipeline.runtime import Runtime
from tests.integration.conftest import WorkerFleet, settings_env
from tests.integration.control_helpers import add_synthetic, control_client, control_runtime, wait_job
from tests.invariants import check_datasets, check_job_counters
from tests.services import S3Service, free_port, wait_for

MONITORING = Path(__file__).resolve().parents[2] / "docs" / "monitoring.md"


def monitoring_queries() -> dict[str, str]:
    found = re.findall(r"<!-- query: (\w+) -->\s*```sql\n(.*?)```", MONITORING.read_text(), re.DOTALL)
    return dict(found)


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def total(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in values.items() if n == name and wanted <= set(lbls))


def object_keys(s3: S3Service, bucket: str) -> set[str]:
    return {o.object_name for o in s3.client().list_objects(bucket, recursive=True)}


def test_cleanup_removes_old_jobs_and_unreferenced_versions_and_every_dataset_still_verifies(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, s3_service: S3Service, s3_bucket: str
) -> None:
    company = add_synthetic(stack, "versioned", days_ahead=2, jobs_per_day=6)
    old = plan_job(stack.engine, actors, trigger="cli", company_ids=[company])
    assert old is not None
    wait_job(stack, old.job_id)
    with stack.engine.begin() as conn:
        conn.execute(update(JOBS).where(JOBS.c.id == old.job_id).values(created_at=utcnow() - timedelta(days=30)))
    update_company(stack.engine, company, config={"days_ahead": 2, "jobs_per_day": 6, "version": 1})
    new = plan_job(stack.engine, actors, trigger="cli", company_ids=[company])
    assert new is not None
    wait_job(stack, new.job_id)
    wait_for(lambda: not any(k.startswith("_staging/") for k in object_keys(s3_service, s3_bucket)), timeout=10,
             what="staging parts of finished tasks to be removed")
    with stack.engine.connect() as conn:
        current = set(conn.execute(select(DATASETS.c.storage_key)).scalars())
    replaced = object_keys(s3_service, s3_bucket) - current
    assert len(current) == 3 and len(replaced) == 2, "the schedule documents changed, the users one did not"
    stack.store.put("_staging/999999/000000.ndjson", b"{}\n")  # left by a task that no longer exists

    report = cleanup(stack.engine, stack.store, retention_days=7, grace_s=0)

    assert (report.jobs_deleted, report.staging_deleted, report.versions_deleted) == (1, 1, 2)
    with stack.engine.connect() as conn:
        assert list(conn.execute(select(JOBS.c.id)).scalars()) == [new.job_id]
        assert conn.execute(select(TASKS).where(TASKS.c.job_id == old.job_id)).all() == []
        assert set(conn.execute(select(DATASETS.c.storage_key)).scalars()) == current
    assert object_keys(s3_service, s3_bucket) == current
    assert check_datasets(stack.engine, s3_service.client(), s3_bucket) == 3
    assert cleanup(stack.engine, stack.store, retention_days=7, grace_s=0).versions_deleted == 0
    assert check_datasets(stack.engine, s3_service.client(), s3_bucket) == 3


def test_metrics_endpoint_counts_tasks_records_bytes_skips_latency_cache_and_pending_age(
    stack: Runtime, actors: Actors
) -> None:
    company = add_synthetic(stack, "measured", days_ahead=2, jobs_per_day=5)
    actors.broker.add_middleware(WorkerMetrics())
    runtime = control_runtime(stack)
    with control_client(runtime, actors) as client, running_worker(actors.broker, threads=2):
        before = samples(client.get("/metrics").text)
        for _ in range(2):  # the second sync finds every checksum unchanged
            job = client.post("/sync", json={"company_ids": [company]}).json()["job_id"]
            wait_job(stack, job)
            client.get(f"/sync/jobs/{job}")
        token = issue_token(runtime.settings, company_id=company, role="admin")
        partition = (utcnow().date()).isoformat()
        for _ in range(2):
            read = client.get(f"/v1/schedule/{partition}", headers={"Authorization": f"Bearer {token}"})
            assert read.status_code == 200
        plan_job(stack.engine, None, trigger="cli", company_ids=[company])  # pending, never sent
        scraped = client.get("/metrics")
    assert scraped.headers["content-type"].startswith("text/plain")
    after = samples(scraped.text)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("pipeline_tasks_finished_total", status="completed", resource="schedule") == 4
    assert delta("pipeline_tasks_finished_total", status="completed", resource="users") == 2
    assert delta("pipeline_records_synced_total", resource="schedule") == 20
    assert delta("pipeline_bytes_written_total") > 0
    assert delta("pipeline_uploads_skipped_total") == 3
    assert delta("pipeline_task_run_seconds_count", outcome="completed") == 6
    assert delta("pipeline_worker_message_duration_seconds_count", actor="sync_partition_high", outcome="ok") == 6
    assert delta("pipeline_http_request_duration_seconds_count", route="/sync", status="202") == 2
    assert delta("pipeline_http_request_duration_seconds_count", route="/sync/jobs/{job_id}") == 2
    assert delta("pipeline_http_request_duration_seconds_count", route="/v1/{resource}/{partition}") == 2
    assert total(after, "pipeline_read_cache_hit_ratio", cache="objects") > 0
    assert total(after, "pipeline_metrics_database_up") == 1
    assert total(after, "pipeline_tasks", status="pending") == 3
    assert total(after, "pipeline_oldest_pending_task_age_seconds") > 0


def test_worker_fleet_serves_the_sum_of_its_processes_metrics_on_one_port(stack: Runtime, actors: Actors) -> None:
    add_synthetic(stack, "fleet", days_ahead=5, jobs_per_day=5)
    port = free_port()
    fleet = WorkerFleet(stack.settings.model_copy(update={"metrics_port": port}))
    try:
        fleet.start(processes=2, threads=2)
        job = plan_job(stack.engine, actors, trigger="cli")
        assert job is not None and job.total_tasks == 6
        wait_job(stack, job.job_id)

        def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            try:
                return samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
            except httpx.HTTPError:
                return {}

        wait_for(lambda: total(scraped(), "pipeline_tasks_finished_total", status="completed") == 6, timeout=20,
                 what="the fleet's metrics to count the 6 tasks")
        values = scraped()
    finally:
        fleet.stop_all()
    assert total(values, "pipeline_worker_message_duration_seconds_count", outcome="ok") == 6
    assert total(values, "pipeline_records_synced_total") == 25 + 20


def test_monitoring_queries_of_the_docs_answer_on_postgresql(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker
) -> None:
    queries = monitoring_queries()
    assert set(queries) == {"jobs_by_type_and_status", "storage_per_company", "failed_jobs_last_day"}
    good = add_synthetic(stack, "good", days_ahead=2, jobs_per_day=4)
    bad = add_synthetic(stack, "bad", days_ahead=1, jobs_per_day=4, poison_partitions=["all"])
    ok = plan_job(stack.engine, actors, trigger="api", company_ids=[good])
    failed = plan_job(stack.engine, actors, trigger="cli", company_ids=[bad])
    old_failure = plan_job(stack.engine, actors, trigger="cli", company_ids=[bad])
    assert ok is not None and failed is not None and old_failure is not None
    for job in (ok, failed, old_failure):
        wait_job(stack, job.job_id)
    long_ago = utcnow() - timedelta(days=2)
    with stack.engine.begin() as conn:
        conn.execute(update(JOBS).where(JOBS.c.id == old_failure.job_id)
                     .values(created_at=long_ago, started_at=long_ago, completed_at=long_ago))

    def run(name: str) -> list[dict[str, Any]]:
        with stack.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(text(queries[name]))]

    by_type = {(row["job_type"], row["status"]): row for row in run("jobs_by_type_and_status")}
    assert set(by_type) == {("api", "completed"), ("cli", "failed")}
    assert by_type[("api", "completed")]["jobs"] == 1 and by_type[("cli", "failed")]["jobs"] == 1
    for row in by_type.values():
        assert 0 <= row["avg_run_s"] <= row["max_run_s"] and row["avg_total_s"] >= row["avg_run_s"]

    storage = {row["company_id"]: row for row in run("storage_per_company")}
    with stack.engine.connect() as conn:
        good_bytes = sum(conn.execute(select(DATASETS.c.size_bytes).where(DATASETS.c.company_id == good)).scalars())
    assert storage[good]["datasets"] == 3 and storage[good]["bytes"] == good_bytes > 0
    assert storage[good]["records"] == 2 * 4 + 20 and storage[good]["last_synced_at"] is not None
    assert storage[bad]["datasets"] == 1, "only the poisoned 'all' partition of users failed"

    (failure,) = run("failed_jobs_last_day")
    assert failure["job_id"] == failed.job_id and failure["failed_tasks"] == 1
    assert "has no primary key" in failure["first_task_error"]


def test_follow_job_reports_progress_from_the_feed_until_the_job_ends(stack: Runtime, actors: Actors) -> None:
    company = add_synthetic(stack, "followed", days_ahead=4, jobs_per_day=8, page_size=4, chunk_delay_s=0.01)
    job = plan_job(stack.engine, actors, trigger="cli", company_ids=[company], resources=["schedule"])
    assert job is not None
    feed = follow_job(stack.engine, job.job_id, idle_s=0.2)
    first = next(feed)
    seen = [(first.status, first.done_tasks)]
    with running_worker(actors.broker, threads=2):
        seen.extend((progress.status, progress.done_tasks) for progress in feed)
    assert seen[0] == ("pending", 0) and seen[-1] == ("completed", 4)
    done = [count for _, count in seen]
    assert done == sorted(done) and {1, 2, 3, 4} <= set(done), seen


def cli(settings_env_: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env={**settings_env_, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)


def test_jobs_cancel_and_retry_and_sync_wait_on_the_command_line(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker
) -> None:
    env = settings_env(stack.settings)
    company = add_synthetic(stack, "cli", days_ahead=2, jobs_per_day=4)
    parked = plan_job(stack.engine, None, trigger="cli", company_ids=[company])  # never sent: stays pending
    assert parked is not None

    cancelled = cli(env, "jobs", "cancel", str(parked.job_id))
    assert cancelled.returncode == 0, cancelled.stderr
    assert "3 open task(s) cancelled" in cancelled.stderr
    assert check_job_counters(stack.engine, parked.job_id) == {"cancelled": 3}
    again = cli(env, "jobs", "cancel", str(parked.job_id))
    assert again.returncode == 2 and "already finished" in again.stderr and "Traceback" not in again.stderr

    retried = cli(env, "jobs", "retry", str(parked.job_id), "--wait")
    assert retried.returncode == 0, retried.stderr
    assert "3 task(s) sent back to work" in retried.stderr and "completed" in retried.stderr
    assert check_job_counters(stack.engine, parked.job_id) == {"completed": 3}

    synced = cli(env, "sync", "--company", str(company), "--wait")
    assert synced.returncode == 0, synced.stderr
    job_id = uuid.UUID(synced.stdout.strip().splitlines()[0])
    assert job_progress(stack.engine, job_id).status == "completed"
    assert f"job {job_id} completed" in " ".join(synced.stderr.split())
