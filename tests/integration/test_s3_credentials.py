"""Wrong S3 credentials on a server that checks signatures (SeaweedFS of the test's own, so its
key can be rotated under a running runtime): a clear authentication error, never an outage to
wait out, ``/healthz`` 503 naming blob storage, and nothing written."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from actors.broker import make_broker
from actors.inprocess import running_worker
from actors.tasks import declare_actors
from pipeline.api import create_app
from pipeline.companies import add_company
from pipeline.errors import StorageAuthError
from pipeline.execution import is_outage, is_retryable
from pipeline.models import Dataset, SyncTask
from pipeline.planning import plan_job
from pipeline.progress import job_progress
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from storage.seaweed import SeaweedFS
from tests import services
from tests.invariants import check_job_counters

JWT_SECRET = "s3-credentials-tests-" + "0123456789abcdef" * 3


@pytest.fixture
def seaweed(tmp_path: Path) -> Iterator[SeaweedFS]:
    """A SeaweedFS server for this test alone: its key is changed under the runtime."""
    with services.seaweed(tmp_path / "seaweedfs") as server:
        yield server


@pytest.fixture
def settings_on(
    make_settings: Callable[..., Settings], stack: Runtime, seaweed: SeaweedFS
) -> Callable[..., Settings]:
    """Settings on the test's SeaweedFS (``stack`` empties the tables before and after)."""
    bucket = services.unique_name("pipeline-auth", separator="-")

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "blob_url": f"s3://{bucket}", "s3_endpoint": seaweed.endpoint, "s3_access_key": seaweed.access_key,
            "s3_secret_key": seaweed.secret_key, "jwt_secret": JWT_SECRET, **overrides,
        }
        return make_settings(**values)

    return make


def rotate_key(server: SeaweedFS) -> None:
    server.change_credentials(access_key=server.access_key, secret_key=secrets.token_urlsafe(24))


def objects_in(server: SeaweedFS) -> list[str]:
    client = server.client()
    return [found.object_name for bucket in client.list_buckets()
            for found in client.list_objects(bucket.name, recursive=True)]


@pytest.mark.parametrize("wrong", ["secret", "access key"])
def test_a_wrong_s3_key_is_an_authentication_error_not_an_outage_and_creates_nothing(
    settings_on: Callable[..., Settings], seaweed: SeaweedFS, wrong: str
) -> None:
    bad_secret = "wrong-" + secrets.token_hex(8)
    override = {"s3_secret_key": bad_secret} if wrong == "secret" else {"s3_access_key": "nobody-we-know"}

    with pytest.raises(StorageAuthError) as caught:
        Runtime.from_settings(settings_on(**override))

    message = str(caught.value)
    assert "authentication rejected" in message and seaweed.endpoint in message
    assert "PIPELINE_S3_SECRET_KEY" in message
    assert bad_secret not in message and seaweed.secret_key not in message
    assert not is_outage(caught.value), "waiting does not fix a wrong key"
    assert not is_retryable(caught.value), "another attempt does not fix a wrong key"
    assert seaweed.client().list_buckets() == [], "not even the bucket was created"


def test_healthz_answers_503_naming_blob_storage_once_the_s3_key_is_rejected(
    settings_on: Callable[..., Settings], seaweed: SeaweedFS
) -> None:
    runtime = Runtime.from_settings(settings_on())
    try:
        with TestClient(create_app(runtime)) as client:
            assert client.get("/healthz").status_code == 200
            rotate_key(seaweed)
            response = client.get("/healthz")
    finally:
        runtime.close()

    assert response.status_code == 503
    body = response.json()
    assert body["checks"] == {"database": "ok", "store": "credentials rejected (StorageAuthError)"}
    assert "blob storage" in body["error"]["message"]
    assert runtime.settings.s3_secret_key is not None
    assert runtime.settings.s3_secret_key not in response.text and seaweed.secret_key not in response.text


def test_a_task_whose_s3_key_was_revoked_fails_at_once_naming_authentication_and_writes_nothing(
    settings_on: Callable[..., Settings], seaweed: SeaweedFS
) -> None:
    runtime = Runtime.from_settings(settings_on())
    broker = make_broker(runtime.settings)
    actors = declare_actors(broker, runtime)
    try:
        add_company(runtime.engine, name="acme", connector="synthetic", config={"jobs_per_day": 5, "days_ahead": 1})
        rotate_key(seaweed)
        with running_worker(broker, threads=2):
            job = plan_job(runtime.engine, actors, trigger="cli", resources=["schedule"])
            assert job is not None
            services.wait_for(lambda: job_progress(runtime.engine, job.job_id).finished, timeout=90,
                              what="the job on a revoked key to finish")
        assert check_job_counters(runtime.engine, job.job_id) == {"failed": job.total_tasks}
        with runtime.engine.connect() as conn:
            tasks = conn.execute(select(SyncTask.attempts, SyncTask.error_message)
                                 .where(SyncTask.job_id == job.job_id)).all()
            datasets = conn.execute(select(func.count()).select_from(Dataset)).scalar_one()
    finally:
        for queue in actors.queues:
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                broker.channel.queue_delete(name)
        broker.close()
        runtime.close()

    for attempts, error in tasks:
        assert attempts == 1, "a rejected key is a config error: no second attempt"
        assert error is not None and "authentication rejected" in error
    assert datasets == 0
    assert objects_in(seaweed) == [], "nothing was written: no staging part, no document"
