"""A tenant's connector config cannot reach what it does not own (DESIGN invariant 10), end to end:
secrets encrypted at rest and write-only, environment references under the allowed prefix, the
SSRF guard at ``company add`` and at connect time, and bounded upstream responses."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import psutil
import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from sqlalchemy import insert, select, text

from actors.tasks import Actors
from pipeline.api import create_app
from pipeline.companies import update_company
from pipeline.errors import ConfigError
from pipeline.models import COMPANIES, JobLog, SyncTask, utcnow
from pipeline.planning import plan_job
from pipeline.progress import job_progress
from pipeline.runtime import Runtime
from pipeline.secrets import SecretBox, check_stored_secrets, sealed_paths
from tests.connectors.support import SECRET
from tests.fakes.upstreams import BigPageApi, ScheduleApi
from tests.integration.conftest import TEST_SECRETS_KEY, WorkerFleet, add_rest_company, settings_env
from tests.integration.test_rest_sync import run_job, schedule_config
from tests.services import wait_for

ADMIN_KEY = "admin-key-for-the-security-tests"
ADMIN = {"X-API-Key": ADMIN_KEY}
API = {"admin_api_key": ADMIN_KEY, "jwt_secret": "a-jwt-secret-for-the-security-tests-0123456789"}


@pytest.fixture
def client(stack: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(stack)) as client:
        yield client


def cli(rt: Runtime, *args: str, drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in settings_env(rt.settings).items() if k not in drop}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env={**env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def task_rows(rt: Runtime) -> list[Any]:
    with rt.engine.connect() as conn:
        return list(conn.execute(select(SyncTask.__table__).order_by(SyncTask.id)).all())


def everything_logged(rt: Runtime) -> str:
    with rt.engine.connect() as conn:
        logs = conn.execute(select(JobLog.message, JobLog.data)).all()
        errors = conn.execute(select(SyncTask.error_message)).scalars().all()
    return repr(logs) + repr(errors)


@pytest.mark.settings(**API)
def test_an_inline_secret_is_encrypted_at_rest_never_shown_and_is_what_the_upstream_receives(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, schedule_api: ScheduleApi, client: TestClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    schedule_api.require_header("Authorization", f"Bearer {SECRET}")
    config = {**schedule_config(schedule_api), "auth": {"type": "bearer", "token": SECRET}}

    created = client.post("/companies", json={"name": "Acme", "connector": "rest", "config": config}, headers=ADMIN)
    assert created.status_code == 201, created.text
    company = created.json()["id"]
    assert created.json()["config"]["auth"] == {"type": "bearer", "token": "***"}

    with stack.engine.connect() as conn:
        row = conn.execute(text("SELECT connector_config::text FROM companies WHERE id = :id"), {"id": company}).one()
    assert SECRET not in row[0] and "$secret" in row[0], "the row holds a Fernet token, not the secret"

    shown = client.get(f"/companies/{company}", headers=ADMIN).text + client.get("/companies", headers=ADMIN).text
    assert SECRET not in shown and '"token":"***"' in shown
    listing, detail = cli(stack, "company", "list"), cli(stack, "company", "show", str(company))
    assert listing.returncode == 0 and detail.returncode == 0, listing.stderr + detail.stderr
    assert "Acme" in listing.stdout and SECRET not in listing.stdout + listing.stderr
    assert '"token": "***"' in detail.stdout and SECRET not in detail.stdout + detail.stderr

    run_job(stack, actors)
    assert [(t.status, t.record_count) for t in task_rows(stack)] == [("completed", 25)], "the upstream took it"
    assert {r.headers["Authorization"] for r in schedule_api.requests} == {f"Bearer {SECRET}"}

    # A PATCH that omits the secret (or sends the mask back) keeps it; the next sync still authenticates.
    omitted = {**config, "auth": {"type": "bearer"}, "pages_per_chunk": 3}
    patched = client.patch(f"/companies/{company}", json={"config": omitted}, headers=ADMIN)
    assert patched.status_code == 200, patched.text
    masked = client.patch(f"/companies/{company}", json={"config": patched.json()["config"]}, headers=ADMIN)
    assert masked.status_code == 200 and masked.json()["config"]["auth"]["token"] == "***"
    schedule_api.fail_next("unauthorized", 1)  # an upstream failure: its error must not carry the token either
    run_job(stack, actors)
    run_job(stack, actors)
    statuses = [t.status for t in task_rows(stack)]
    assert statuses[-1] == "completed" and "failed" in statuses

    assert SECRET not in everything_logged(stack)
    assert SECRET not in caplog.text


@pytest.mark.settings(**API)
def test_a_patch_cannot_carry_a_secret_into_another_auth_kind_or_submit_a_ciphertext(
    stack: Runtime, schedule_api: ScheduleApi, client: TestClient
) -> None:
    config = {**schedule_config(schedule_api), "auth": {"type": "bearer", "token": SECRET}}
    company = add_rest_company(stack, name="c", connector="rest", config=config)
    switched = {**config, "auth": {"type": "header", "name": "X-Api-Key"}}
    answer = client.patch(f"/companies/{company.id}", json={"config": switched}, headers=ADMIN)
    assert answer.status_code == 422 and "auth" in answer.json()["error"]["message"]

    stored = company.connector_config["auth"]["token"]
    forged = {**config, "auth": {"type": "bearer", "token": stored}}
    answer = client.patch(f"/companies/{company.id}", json={"config": forged}, headers=ADMIN)
    assert answer.status_code == 422 and "auth.token" in answer.json()["error"]["message"]

    fresh = {**schedule_config(schedule_api), "auth": {"type": "bearer", "token": "***"}}
    answer = client.post("/companies", json={"name": "d", "connector": "rest", "config": fresh}, headers=ADMIN)
    assert answer.status_code == 422 and "none is stored" in answer.json()["error"]["message"]


@pytest.mark.parametrize("variable", ["PIPELINE_JWT_SECRET", "PIPELINE_DATABASE_URL", "AWS_SECRET_ACCESS_KEY", "PATH"])
@pytest.mark.settings(**API)
def test_a_config_naming_a_variable_outside_the_allowed_prefix_is_rejected_naming_the_key(
    variable: str, stack: Runtime, schedule_api: ScheduleApi, client: TestClient
) -> None:
    bearer = {**schedule_config(schedule_api), "auth": {"type": "bearer", "token_env": variable}}
    header = {**schedule_config(schedule_api), "auth": {"type": "header", "name": "X-Key", "value_env": variable}}
    with pytest.raises(ConfigError) as caught:
        add_rest_company(stack, name="c", connector="rest", config=bearer)
    assert "auth.token_env" in str(caught.value) and variable in str(caught.value)
    assert "CONNECTOR_" in str(caught.value)

    answer = client.post("/companies", json={"name": "c", "connector": "rest", "config": header}, headers=ADMIN)
    assert answer.status_code == 422 and "auth.value_env" in answer.json()["error"]["message"]
    assert variable in answer.json()["error"]["message"]

    company = add_rest_company(stack, name="ok", connector="rest", config=schedule_config(schedule_api))
    with pytest.raises(ConfigError, match=f"auth.token_env: variable {variable} is not allowed"):
        update_company(stack.engine, company.id, config=bearer, context=stack.connector_context)


def test_a_stored_config_naming_a_forbidden_variable_fails_its_task_and_sends_nothing(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, schedule_api: ScheduleApi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIPELINE_JWT_SECRET", "the-signing-secret")
    config = {**schedule_config(schedule_api), "auth": {"type": "bearer", "token_env": "PIPELINE_JWT_SECRET"}}
    now = utcnow()
    with stack.engine.begin() as conn:  # written before the prefix rule existed
        conn.execute(insert(COMPANIES).values(name="old", connector="rest", connector_config=config,
                                              feature_toggles={}, sync_enabled=True, created_at=now, updated_at=now))
    run_job(stack, actors)
    [task] = task_rows(stack)
    assert task.status == "failed" and task.attempts == 1
    assert "auth.token_env" in task.error_message and "PIPELINE_JWT_SECRET" in task.error_message
    assert schedule_api.requests == [], "nothing was sent upstream"
    assert "the-signing-secret" not in everything_logged(stack)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback port whose connections wait in its backlog: any connection made is seen."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


@pytest.mark.settings(upstream_allowlist="10.99.0.0/16")  # loopback is not allowlisted in this test
def test_a_company_on_a_loopback_port_not_allowlisted_fails_naming_the_address_and_no_connection_is_made(
    stack: Runtime, actors: Actors, worker: dramatiq.Worker, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    config = {"base_url": f"http://localhost:{port}", "resources": {"items": {"path": "/items", "primary_key": "id"}}}
    with pytest.raises(ConfigError, match=r"base_url: 127\.0\.0\.1 is a loopback address.*ALLOWLIST"):
        add_rest_company(stack, name="literal", connector="rest", config={**config, "base_url": f"http://127.0.0.1:{port}"})
    add_rest_company(stack, name="by name", connector="rest", config=config)  # names are checked when connecting

    run_job(stack, actors)
    [task] = task_rows(stack)
    assert task.status == "failed" and task.attempts == 1, "refused at once, not retried"
    assert f"127.0.0.1:{port}" in task.error_message and "PIPELINE_UPSTREAM_ALLOWLIST" in task.error_message
    with pytest.raises(BlockingIOError):
        listener.accept()  # the listener saw no connection


@pytest.mark.settings(**API)
def test_the_cloud_metadata_address_is_rejected_at_company_add(stack: Runtime, client: TestClient) -> None:
    config = {"base_url": "http://169.254.169.254/",
              "resources": {"m": {"path": "/latest/meta-data", "primary_key": "id"}}}
    answer = client.post("/companies", json={"name": "m", "connector": "rest", "config": config}, headers=ADMIN)
    assert answer.status_code == 403  # well formed, forbidden by the network policy
    assert answer.json()["error"]["code"] == "upstream_refused"
    assert "base_url: 169.254.169.254 is a link-local address" in answer.json()["error"]["message"]
    added = cli(stack, "company", "add", "m", "--connector", "rest", "--config", f"{config}".replace("'", '"'))
    assert added.returncode == 2 and "169.254.169.254" in added.stderr and "Traceback" not in added.stderr
    with stack.engine.connect() as conn:
        assert conn.execute(select(COMPANIES.c.id)).all() == []


def test_an_inline_secret_without_a_key_is_refused_and_a_worker_or_api_without_the_key_does_not_start(
    stack: Runtime, schedule_api: ScheduleApi,
) -> None:
    config = {**schedule_config(schedule_api), "auth": {"type": "header", "name": "X-Api-Key", "value": SECRET}}
    with pytest.raises(ConfigError, match="PIPELINE_SECRETS_KEY is not set"):
        add_rest_company(Runtime(settings=stack.settings.model_copy(update={"secrets_key": None}),
                                 engine=stack.engine, store=stack.store), name="c", connector="rest", config=config)
    add_rest_company(stack, name="c", connector="rest", config=config)

    for command in (("worker", "--processes", "1"), ("serve", "--port", str(free_port()))):
        started = cli(stack, *command, drop=("PIPELINE_SECRETS_KEY",))
        assert started.returncode == 2, command
        assert "PIPELINE_SECRETS_KEY is not set" in started.stderr and "Traceback" not in started.stderr
    with pytest.raises(ConfigError, match="PIPELINE_SECRETS_KEY does not decrypt"):
        check_stored_secrets(stack.engine, SecretBox(Fernet.generate_key().decode()))


def test_secrets_rotate_re_encrypts_every_stored_secret_under_the_first_key(
    stack: Runtime, schedule_api: ScheduleApi,
) -> None:
    for index in range(3):
        auth = {"type": "bearer", "token": f"{SECRET}-{index}"}
        config = {**schedule_config(schedule_api), "auth": auth}
        add_rest_company(stack, name=f"c{index}", connector="rest", config=config)
    new_key = Fernet.generate_key().decode()
    both = stack.settings.model_copy(update={"secrets_key": None})
    env_both = {**settings_env(both), "PIPELINE_SECRETS_KEY": f"{new_key},{TEST_SECRETS_KEY}", "COLUMNS": "200"}
    rotated = subprocess.run([sys.executable, "-m", "pipeline.cli", "secrets", "rotate"], env=env_both,
                             capture_output=True, text=True, timeout=120, check=False)
    assert rotated.returncode == 0, rotated.stderr
    assert "re-encrypted 3 secret(s) of 3 company(ies)" in rotated.stderr
    assert check_stored_secrets(stack.engine, SecretBox(new_key)) == 3, "the new key alone opens them all"
    with pytest.raises(ConfigError):
        check_stored_secrets(stack.engine, SecretBox(TEST_SECRETS_KEY))
    with stack.engine.connect() as conn:
        configs = conn.execute(select(COMPANIES.c.connector_config)).scalars().all()
    assert all(sealed_paths(config) == [("auth", "token")] for config in configs)


def _rss_peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(300)
def test_a_65_mib_upstream_page_fails_the_task_naming_the_cap_with_worker_rss_bounded(
    stack: Runtime, actors: Actors, worker_fleet: WorkerFleet,
) -> None:
    size = 65 * 1024 * 1024
    with BigPageApi(size) as api:
        config = {"base_url": api.base_url, "retry": {"max_attempts": 1},
                  "resources": {"items": {"path": "/items", "primary_key": "id"}}}
        add_rest_company(stack, name="big", connector="rest", config=config)
        main = psutil.Process(worker_fleet.start(threads=1).pid)

        def worker_processes() -> list[psutil.Process]:
            return list(main.children())  # Dramatiq forks one worker process per --processes

        wait_for(lambda: len(worker_processes()) == 1, timeout=60, what="the worker process")
        [process] = worker_processes()
        wait_for(lambda: process.memory_info().rss > 0 and _rss_peak(process.pid) > 0, timeout=30, what="RSS")
        before = _rss_peak(process.pid)
        job = plan_job(stack.engine, actors, trigger="cli")
        assert job is not None
        wait_for(lambda: job_progress(stack.engine, job.job_id).finished, timeout=240, what="the big page task")
        growth = _rss_peak(process.pid) - before
    print(f"worker RSS peak grew by {growth / 2**20:.1f} MiB reading a {size / 2**20:.0f} MiB page (cap 64 MiB)")
    [task] = task_rows(stack)
    assert task.status == "failed" and task.attempts == 1
    assert "PIPELINE_UPSTREAM_MAX_RESPONSE_BYTES" in task.error_message and "64 MiB" in task.error_message
    # At most the cap is held (measured: ~80 MiB growth); reading and parsing the whole page
    # without a cap grew it by ~230 MiB.
    assert growth < 100 * 2**20, f"worker RSS grew by {growth / 2**20:.0f} MiB"
