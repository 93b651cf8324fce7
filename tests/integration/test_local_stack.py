"""``scripts/stack`` (``pipeline.stack``) and the README's real-stack commands, end to end: the
local PostgreSQL and RabbitMQ, a SeaweedFS of the stack's own, three companies synced by a
``pipeline worker``, and every object read back with boto3 (a client we did not write)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import psycopg
import pytest
from botocore.config import Config

from pipeline.stack import BUCKET, Stack, StackState, conninfo
from tests import services

pytestmark = pytest.mark.skipif(
    not (shutil.which("rabbitmqctl") and (shutil.which("pg_ctlcluster") or services.postgres_answers(
        services.LOCAL_POSTGRES_ADMIN_URL))),
    reason="scripts/stack runs on a host with PostgreSQL and RabbitMQ installed",
)


@pytest.fixture
def local_stack(tmp_path: Path) -> Iterator[tuple[Stack, StackState]]:
    stack = Stack(tmp_path / ".stack", name=services.unique_name("pipeline_stack"))
    try:
        yield stack, stack.up()
    finally:
        stack.down(purge=True)


def pipeline(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"pipeline {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout


def test_stack_up_then_the_readme_commands_sync_three_companies_whose_objects_boto3_verifies(
    local_stack: tuple[Stack, StackState],
) -> None:
    stack, state = local_stack
    again = stack.up()
    assert again.seaweed_pid == state.seaweed_pid, "up is idempotent: the running server is kept"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIPELINE_")}
    env.update(stack.environment(state), PIPELINE_LOG_LEVEL="WARNING")

    pipeline(env, "migrate")
    for index in range(3):
        pipeline(env, "company", "add", f"Acme {index}", "--connector", "synthetic",
                 "--config", f'{{"jobs_per_day": {10 + index}}}')
    worker = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker", "--processes", "1", "--threads", "2"],
                              env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        job_id = pipeline(env, "sync", "--wait").strip()
    finally:
        worker.terminate()
        worker.wait(timeout=60)

    with psycopg.connect(conninfo(state.database_url)) as conn:
        job = conn.execute("SELECT status, completed_tasks, failed_tasks FROM sync_jobs WHERE id = %s",
                           (job_id,)).fetchone()
        rows = conn.execute("SELECT company_id, storage_key, size_bytes, checksum_sha256 FROM datasets").fetchall()
    assert job == ("completed", 24, 0)
    assert len({row[0] for row in rows}) == 3 and len(rows) == 3 * 8
    s3 = boto3.client(
        "s3", endpoint_url=f"http://{env['PIPELINE_S3_ENDPOINT']}", region_name="us-east-1",
        aws_access_key_id=state.access_key, aws_secret_access_key=state.secret_key,
        config=Config(signature_version="s3v4", retries={"max_attempts": 1}),
    )
    for _, key, size, checksum in rows:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert len(body) == size, key
        assert hashlib.sha256(body).hexdigest() == checksum, key
    listed = {found["Key"] for found in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert {row[1] for row in rows} <= listed
