"""A newcomer's mistakes get one line, not a traceback: every command that uses a service, run as
a subprocess against each way that service can be missing — a database never migrated or
migrated by an older version, a database, RabbitMQ or S3 server that is not there, an S3 secret
that is wrong. Each answers with exit code 3 and one line on stderr naming the service, its URL
without the password, and the fix.

``pipeline token``, ``pipeline secrets keygen`` and ``pipeline demo`` use no configured service
(the demo brings its own SQLite file and blob directory), so they are not in the matrix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio.error import S3Error

from pipeline.migrate import upgrade
from tests.services import S3Service, free_port, unique_name

SECRET = "n3wc0mer-s3cret"  # every password in the broken settings: it must never be printed
JOB_ID = str(uuid.uuid4())

COMMANDS: dict[str, list[str]] = {
    "migrate": ["migrate"],
    "company add": ["company", "add", "Acme", "--connector", "synthetic"],
    "company list": ["company", "list"],
    "company show": ["company", "show", "1"],
    "company set-toggles": ["company", "set-toggles", "1", "{}"],
    "company set-config": ["company", "set-config", "1", "{}"],
    "company enable": ["company", "enable", "1"],
    "sync": ["sync"],
    "sweep": ["sweep"],
    "cleanup": ["cleanup"],
    "secrets rotate": ["secrets", "rotate"],
    "jobs list": ["jobs", "list"],
    "jobs show": ["jobs", "show", JOB_ID],
    "jobs cancel": ["jobs", "cancel", JOB_ID],
    "jobs retry": ["jobs", "retry", JOB_ID],
    "serve": ["serve", "--port", "{port}"],
    "worker": ["worker", "--processes", "1", "--threads", "1"],
    "scheduler": ["scheduler"],
}
USES_BROKER = {"sync", "sweep", "jobs retry", "serve", "worker", "scheduler"}
STORE_AND_SCHEMA_CONDITIONS = ("no schema", "old schema", "database down", "s3 down", "s3 wrong secret")


@dataclass(frozen=True)
class Expected:
    """What the one line must name: the service, its URL as shown, and the fix."""

    service: str
    url: str
    fix: str


@dataclass(frozen=True)
class Condition:
    environment: dict[str, str]
    expected: Expected


def matrix() -> list[tuple[str, str]]:
    pairs = [("migrate", "database down")]
    for command in COMMANDS:
        if command == "migrate":
            continue
        pairs += [(command, condition) for condition in STORE_AND_SCHEMA_CONDITIONS]
        if command in USES_BROKER:
            pairs.append((command, "broker down"))
    return pairs


@pytest.fixture(scope="module")
def databases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A migrated SQLite file, one at the first revision only, and an empty one."""
    root = tmp_path_factory.mktemp("cli-databases")
    files = {"current": root / "current.db", "old": root / "old.db", "empty": root / "empty.db"}
    upgrade(f"sqlite:///{files['current']}")
    upgrade(f"sqlite:///{files['old']}", "0001")
    files["empty"].touch()
    return files


@pytest.fixture(scope="module")
def wrong_secret_works(s3_service: S3Service) -> bool:
    """False on an S3 server that checks signatures (as a real one does); moto accepts any."""
    client = S3Service(s3_service.endpoint, s3_service.access_key, SECRET, s3_service.secure).client()
    try:
        client.bucket_exists(unique_name("pipeline-probe", separator="-"))
    except S3Error:
        return False
    return True


@pytest.fixture
def conditions(
    databases: dict[str, Path], amqp_url: str, s3_service: S3Service, tmp_path: Path
) -> Callable[[str], Condition]:
    healthy = {
        "PIPELINE_DATABASE_URL": f"sqlite:///{databases['current']}",
        "PIPELINE_BLOB_URL": f"file://{tmp_path / 'blobs'}",
        "PIPELINE_BROKER_URL": amqp_url,
        "PIPELINE_JWT_SECRET": "x" * 40,
        "PIPELINE_QUEUE_NAME": f"cli-{uuid.uuid4().hex[:8]}",
    }

    def condition(name: str) -> Condition:
        port = free_port()
        if name in ("no schema", "old schema"):
            path = databases["empty" if name == "no schema" else "old"]
            url = f"sqlite:///{path}"
            return Condition({**healthy, "PIPELINE_DATABASE_URL": url}, Expected("the database", url,
                                                                                  "run `pipeline migrate`"))
        if name == "database down":
            url = f"postgresql://pipeline:{SECRET}@127.0.0.1:{port}/pipeline"
            return Condition({**healthy, "PIPELINE_DATABASE_URL": url},
                             Expected("the database", url.replace(SECRET, "***"), "PIPELINE_DATABASE_URL"))
        if name == "broker down":
            url = f"amqp://guest:{SECRET}@127.0.0.1:{port}/%2F"
            return Condition({**healthy, "PIPELINE_BROKER_URL": url},
                             Expected("RabbitMQ", url.replace(SECRET, "***"), "PIPELINE_BROKER_URL"))
        if name in ("s3 down", "s3 wrong secret"):
            endpoint = f"127.0.0.1:{port}" if name == "s3 down" else s3_service.endpoint
            access = "newcomer" if name == "s3 down" else s3_service.access_key
            s3 = {"PIPELINE_BLOB_URL": f"s3://{unique_name('pipeline-cli', separator='-')}",
                  "PIPELINE_S3_ENDPOINT": endpoint, "PIPELINE_S3_ACCESS_KEY": access,
                  "PIPELINE_S3_SECRET_KEY": SECRET, "PIPELINE_S3_SECURE": str(s3_service.secure).lower()}
            fix = "PIPELINE_S3_ENDPOINT" if name == "s3 down" else "PIPELINE_S3_SECRET_KEY"
            return Condition({**healthy, **s3}, Expected("the S3 server", endpoint, fix))
        raise AssertionError(f"unknown condition {name}")

    return condition


def run_cli(args: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("PIPELINE_")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], env={**base, "COLUMNS": "80", **environment},
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(("command", "condition_name"), matrix(), ids=[f"{c}-{n}" for c, n in matrix()])
def test_command_answers_a_missing_service_with_one_line_naming_it_its_url_and_the_fix(
    command: str, condition_name: str, conditions: Callable[[str], Condition], request: pytest.FixtureRequest
) -> None:
    if condition_name == "s3 wrong secret" and request.getfixturevalue("wrong_secret_works"):
        pytest.skip("this S3 server accepts any signature (moto): a wrong secret cannot be shown")
    condition = conditions(condition_name)
    args = [arg.replace("{port}", str(free_port())) for arg in COMMANDS[command]]
    result = run_cli(args, condition.environment)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert condition.expected.service in line, line
    assert condition.expected.url in line, line
    assert condition.expected.fix in line, line
    assert SECRET not in result.stderr + result.stdout
