"""The ``pipeline`` command line, run as a user runs it: a subprocess on the embedded default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    base["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], env={**base, **(env or {})}, cwd=cwd,
        capture_output=True, text=True, timeout=180, check=False, stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def embedded(tmp_path: Path) -> dict[str, str]:
    """Environment for the embedded default in a scratch directory, migrated."""
    env = {"PIPELINE_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}", "PIPELINE_BLOB_URL": f"file://{tmp_path / 'b'}",
           "PIPELINE_RETRY_MIN_BACKOFF_MS": "10", "PIPELINE_RETRY_MAX_BACKOFF_MS": "50"}
    result = run("migrate", env=env)
    assert result.returncode == 0, result.stderr
    return env


def test_demo_runs_the_whole_flow_with_no_services_and_rewrites_nothing_the_second_time(tmp_path: Path) -> None:
    first = run("demo", "--directory", str(tmp_path / "demo"))
    assert first.returncode == 0, first.stderr
    assert "datasets written" in first.stdout
    assert "completed: 24 completed, 0 failed" in " ".join(first.stderr.split())
    blobs = sorted(p for p in (tmp_path / "demo" / "blobs").rglob("*.json") if not p.name.startswith("."))
    assert len(blobs) == 24
    stamps = {p: p.stat().st_mtime_ns for p in blobs}
    second = run("demo", "--directory", str(tmp_path / "demo"))
    assert second.returncode == 0, second.stderr
    assert {p: p.stat().st_mtime_ns for p in blobs} == stamps, "unchanged documents are not rewritten"


def test_company_add_rejects_an_invalid_config_naming_the_key(embedded: dict[str, str]) -> None:
    bad = run("company", "add", "Acme", "--connector", "synthetic", "--config", '{"jobs_per_dya": 3}', env=embedded)
    assert bad.returncode == 2
    assert "jobs_per_dya" in bad.stderr
    assert "Traceback" not in bad.stderr
    malformed = run("company", "add", "Acme", "--connector", "synthetic", "--config", "{nope", env=embedded)
    assert malformed.returncode == 2 and "--config is not valid JSON" in malformed.stderr
    unknown = run("company", "add", "Acme", "--connector", "nosuch", env=embedded)
    assert unknown.returncode == 2 and "unknown connector 'nosuch'" in unknown.stderr
    listing = run("company", "list", env=embedded)
    assert "Acme" not in listing.stdout, "nothing was stored"


def test_company_add_reads_config_from_a_file_and_sync_runs_in_process(
    embedded: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"jobs_per_day": 4, "days_ahead": 2}')
    added = run("company", "add", "Acme", "--connector", "synthetic", "--config", f"@{config}",
                "--toggles", '{"TechDashboard_DisplayBillRate": false}', "--external-id", "acme", env=embedded)
    assert added.returncode == 0, added.stderr
    company_id = added.stdout.strip()
    assert company_id.isdigit()
    synced = run("sync", "--company", company_id, env=embedded)
    assert synced.returncode == 0, synced.stderr
    job_id = synced.stdout.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", job_id)
    shown = run("jobs", "show", job_id, env=embedded)
    assert shown.returncode == 0 and "completed, 100.0% (3/3)" in shown.stderr
    listed = run("jobs", "list", env=embedded)
    assert job_id[:8] in listed.stdout


def test_sync_exits_non_zero_when_the_job_fails(embedded: dict[str, str]) -> None:
    added = run("company", "add", "Broken", "--connector", "synthetic", "--config",
                '{"days_ahead": 1, "poison_partitions": ["all"]}', env=embedded)
    assert added.returncode == 0, added.stderr
    synced = run("sync", env=embedded)
    assert synced.returncode == 1
    assert "failed" in synced.stderr


def test_unknown_company_and_resource_are_clear_errors(embedded: dict[str, str]) -> None:
    assert run("company", "add", "A", "--connector", "synthetic", env=embedded).returncode == 0
    missing = run("sync", "--company", "999", env=embedded)
    assert missing.returncode == 2 and "unknown company id(s): 999" in missing.stderr
    resource = run("sync", "--resource", "invoices", env=embedded)
    assert resource.returncode == 2 and "unknown resource(s): invoices" in resource.stderr
    bad_job = run("jobs", "show", "not-a-uuid", env=embedded)
    assert bad_job.returncode == 2 and "not a job id" in bad_job.stderr


def test_a_bad_setting_stops_start_up_naming_the_variable(embedded: dict[str, str]) -> None:
    for name, value in [("PIPELINE_MAX_ATTEMPTS", "zero"), ("PIPELINE_BLOB_URL", "ftp://x"),
                        ("PIPELINE_SCHEDULE_CRON", "every hour"), ("PIPELINE_DATABASE_URL", "mysql://x")]:
        result = run("company", "list", env={**embedded, name: value})
        assert result.returncode == 2, name
        assert name in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_worker_refuses_to_start_without_a_broker(embedded: dict[str, str]) -> None:
    result = run("worker", env=embedded)
    assert result.returncode == 2 and "PIPELINE_BROKER_URL is not set" in result.stderr
