"""``docker-compose.yml`` checked without a Docker engine.

The file is validated against the Compose Specification's JSON schema (vendored by the maintained
``check-jsonschema`` package), then each app service (``migrate``, ``worker``, ``scheduler``,
``api``) runs its own ``command`` through the image's ``ENTRYPOINT`` with its own ``environment``,
defaults interpolated as ``docker compose`` would with nothing exported. Only what compose's
network and port publishing would do is changed: the service host names ``postgres``,
``rabbitmq`` and ``minio`` point at the test's PostgreSQL database, RabbitMQ vhost and S3 bucket
(the bucket stands in for ``minio-init``), and the api listens on a free loopback port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import yaml

from tests.services import S3Service, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
APP_SERVICES = ("migrate", "worker", "scheduler", "api")
# ${NAME}, ${NAME:-default}, ${NAME-default}; "$$" is a literal "$".
INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


def interpolate(value: str, environment: Mapping[str, str]) -> str:
    """Compose's variable substitution for the forms this file uses; anything else is an error."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group("name"), match.group("op"), match.group("default")
        if op == ":-":
            return environment.get(name) or default
        if op == "-":
            return environment.get(name, default)
        if name not in environment:
            raise ValueError(f"docker-compose.yml uses ${{{name}}} without a default and it is not set")
        return environment[name]

    result = INTERPOLATION.sub(substitute, value)
    if "${" in result:
        raise ValueError(f"unsupported interpolation in docker-compose.yml: {value!r}")
    return result


def load_compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())  # anchors and "<<" merges resolved
    return loaded


def image_entrypoint() -> list[str]:
    """The Dockerfile's exec-form ENTRYPOINT (the program every service command is given to)."""
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            entrypoint: list[str] = json.loads(line.removeprefix("ENTRYPOINT"))
            return entrypoint
    raise AssertionError("the Dockerfile has no ENTRYPOINT")


@dataclass(frozen=True)
class Service:
    """One app service of the compose file, ready to run on this machine."""

    name: str
    argv: list[str]
    environment: dict[str, str]


@dataclass(frozen=True)
class LocalServices:
    """What the compose service host names map to in this test."""

    database_url: str
    amqp_url: str
    s3: S3Service
    bucket: str


def map_environment(environment: Mapping[str, str], local: LocalServices) -> dict[str, str]:
    """Point the URLs at compose's service names (postgres, rabbitmq, minio) at the test's services."""
    mapped = dict(environment)
    for key, value in environment.items():
        host = urlsplit(value).hostname if "://" in value else None
        if key == "PIPELINE_DATABASE_URL" and host == "postgres":
            mapped[key] = local.database_url
        elif key == "PIPELINE_BROKER_URL" and host == "rabbitmq":
            mapped[key] = local.amqp_url
        elif key == "PIPELINE_S3_ENDPOINT" and value.split(":")[0] == "minio":
            # The minio service's endpoint and its root credentials go together.
            mapped[key] = local.s3.endpoint
            mapped["PIPELINE_S3_ACCESS_KEY"] = local.s3.access_key
            mapped["PIPELINE_S3_SECRET_KEY"] = local.s3.secret_key
            mapped["PIPELINE_S3_SECURE"] = "true" if local.s3.secure else "false"
        elif key == "PIPELINE_BLOB_URL" and value.startswith("s3://"):
            mapped[key] = f"s3://{local.bucket}"  # the bucket minio-init would have made
    return mapped


def compose_service(compose: dict[str, Any], name: str, local: LocalServices) -> Service:
    spec = compose["services"][name]
    command = spec["command"]
    command = shlex.split(command) if isinstance(command, str) else list(command)
    program, *entry_args = image_entrypoint()
    # The image puts its venv's bin first on PATH: here that is the test interpreter's bin.
    argv = [str(Path(sys.executable).parent / program), *entry_args, *command]
    raw_env = spec.get("environment") or {}
    if isinstance(raw_env, list):
        raw_env = dict(item.split("=", 1) for item in raw_env)
    # Interpolated as `docker compose up` would on a machine where nothing is exported.
    environment = {key: interpolate(str(value), {}) for key, value in raw_env.items()}
    return Service(name, argv, map_environment(environment, local))


def process_env(service: Service) -> dict[str, str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("PIPELINE_")}
    return {**base, **service.environment}


def publish_port(argv: list[str], port: int) -> list[str]:
    """What ``ports: ["HOST:8000"]`` does, on loopback: ``--port`` becomes a free port, ``--host`` 127.0.0.1."""
    published = list(argv)
    for flag, value in (("--port", str(port)), ("--host", "127.0.0.1")):
        assert flag in published, f"the api command has no {flag}: {argv}"
        published[published.index(flag) + 1] = value
    return published


@pytest.fixture
def local_services(
    make_database: Callable[[], str], amqp_url: str, s3_service: S3Service, s3_bucket: str
) -> LocalServices:
    return LocalServices(database_url=make_database(), amqp_url=amqp_url, s3=s3_service, bucket=s3_bucket)


@dataclass
class Started:
    service: Service
    process: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[Service], Started]]:
    """Start a long-running service as a process group; SIGTERM (then SIGKILL) at the end."""
    started: list[Started] = []

    def run(service: Service) -> Started:
        log = tmp_path / f"{service.name}.log"
        with log.open("w") as sink:
            process = subprocess.Popen(service.argv, env=process_env(service), stdout=sink, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        started.append(Started(service, process, log))
        return started[-1]

    yield run
    for item in started:
        if item.process.poll() is None:
            os.killpg(item.process.pid, 15)
    for item in started:
        try:
            item.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(item.process.pid, 9)
            item.process.wait(timeout=10)


def test_compose_file_is_valid_against_the_compose_specification_schema() -> None:
    schema_text = (resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    schema = json.loads(schema_text)
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
                for error in validator.iter_errors(load_compose())]
    assert not problems, "docker-compose.yml breaks the Compose Specification:\n" + "\n".join(problems)


def test_compose_app_services_start_and_work_with_their_own_commands_and_default_environment(
    local_services: LocalServices, start: Callable[[Service], Started], tmp_path: Path
) -> None:
    compose = load_compose()
    services = {name: compose_service(compose, name, local_services) for name in APP_SERVICES}
    for name in ("worker", "scheduler", "api"):
        depends = compose["services"][name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name

    migrate = services["migrate"]
    migrated = subprocess.run(migrate.argv, env=process_env(migrate), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=180, check=False)
    assert migrated.returncode == 0, f"migrate exited {migrated.returncode}: {migrated.stderr.strip()}"

    api_port = free_port()
    api_service = services["api"]
    api = start(Service("api", publish_port(api_service.argv, api_port), api_service.environment))
    scheduler = start(services["scheduler"])
    worker = start(services["worker"])

    def api_healthy() -> bool:
        if api.process.poll() is not None:
            raise AssertionError(f"the api service exited {api.process.returncode}: {api.output().strip()}")
        try:
            return httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(api_healthy, timeout=120, what="the api service to answer /healthz with 200")

    # The worker consumes a task: a sync planned through the stack's own CLI completes.
    cli = [str(Path(sys.executable).parent / "pipeline")]
    env = process_env(worker.service)
    added = subprocess.run([*cli, "company", "add", "Compose Co", "--connector", "synthetic", "--config",
                            '{"days_ahead": 1, "jobs_per_day": 3}'], env=env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=120, check=False)
    assert added.returncode == 0, added.stderr
    synced = subprocess.run([*cli, "sync", "--wait"], env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300, check=False)
    assert worker.process.poll() is None, f"the worker service exited: {worker.output().strip()}"
    assert synced.returncode == 0, f"sync through the worker service failed: {synced.stderr.strip()}"
    assert "completed" in synced.stderr

    # The scheduler came up and is still up after all of the above.
    assert scheduler.process.poll() is None, f"the scheduler service exited: {scheduler.output().strip()}"
    wait_for(lambda: "scheduler running" in scheduler.output(), timeout=60, what="the scheduler's start line")
    assert scheduler.process.poll() is None, f"the scheduler service exited: {scheduler.output().strip()}"
