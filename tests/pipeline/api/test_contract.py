"""schemathesis 4's CLI with ``--checks all`` against a running ``pipeline serve``: it finds nothing.

All four phases (examples, coverage, fuzzing, stateful) run, authenticated with both schemes the
document declares: the admin key (``APIKeyHeader``) and a bearer JWT (``bearer``). The server is
a real process on a free loopback port, on its own PostgreSQL database, with a RabbitMQ virtual
host that no worker consumes (syncs are planned and queued, never run, so the fuzzer cannot make
the box sync a billion synthetic jobs).

No check is switched off. The one rule of the company writes that no JSON Schema can state (a
graphql resource's ``query`` is one GraphQL query declaring the variables the resource sets) is
stated in words in the document and taught to the generator by ``contract_hooks.py`` (loaded
through ``SCHEMATHESIS_HOOKS``), so positive data acceptance holds for graphql bodies too; the test
also asserts that a company of every connector was created.

The CI run is bounded: 5 examples per operation, one seed, a technician's token (the bearer with the
most filtering) — about three minutes on a loaded two-core box. A longer run, both token roles, a
random seed (printed on failure)::

    CONTRACT_MAX_EXAMPLES=100 CONTRACT_SEED=random CONTRACT_ROLES=manager,technician \
        scripts/test tests/pipeline/api/test_contract.py -s --timeout 3600
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from pipeline.auth import issue_token
from pipeline.companies import add_company
from pipeline.migrate import upgrade
from pipeline.settings import Settings, settings_environment
from storage.local import LocalBlobStore
from tests.pipeline.api.helpers import ISSUER, PARTITION, SECRET, publish_document, schedule_document
from tests.services import free_port, wait_for

ADMIN_KEY = "contract-admin-key-0123456789"
MAX_EXAMPLES = int(os.environ.get("CONTRACT_MAX_EXAMPLES", "5"))
SEED = os.environ.get("CONTRACT_SEED", "1")
ROLES = os.environ.get("CONTRACT_ROLES", "technician").split(",")
BIN = Path(sys.executable).parent
HOOKS = Path(__file__).with_name("contract_hooks.py")


@dataclass
class Served:
    url: str
    settings: Settings
    company_ids: list[int]


@pytest.fixture
def served(make_database: Callable[[], str], amqp_url: str, tmp_path: Path) -> Iterator[Served]:
    database_url = make_database()
    upgrade(database_url)
    blobs = tmp_path / "blobs"
    settings = Settings(
        database_url=database_url,
        blob_url=blobs.as_uri(),
        broker_url=amqp_url,
        jwt_secret=SECRET,
        jwt_issuer=ISSUER,
        admin_api_key=ADMIN_KEY,
        s3_endpoint=None,
        api_max_body_bytes=64 * 1024,
        secrets_key=Fernet.generate_key().decode(),  # inline secrets are part of the contract
    )
    from pipeline.db import make_engine

    engine = make_engine(database_url)
    store = LocalBlobStore(blobs)
    company_ids = []
    for name in ("Contract A", "Contract B"):
        company = add_company(engine, name=name, connector="synthetic", config={"jobs_per_day": 5})
        publish_document(
            engine, store, company_id=company.id, resource="schedule", partition=PARTITION,
            document=schedule_document(company.id, jobs=5),
        )
        company_ids.append(company.id)
    engine.dispose()
    port = free_port()
    environment = {**os.environ, **settings_environment(settings)}
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [str(BIN / "pipeline"), "serve", "--port", str(port)], env=environment, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert server.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, timeout=60, what="pipeline serve to answer /healthz")
        yield Served(url=url, settings=settings, company_ids=company_ids)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()


# Both security schemes of the document. A 413 (body over PIPELINE_API_MAX_BODY_BYTES) is a
# rejection too: the fuzzer's oversized invalid bodies are refused before they are parsed.
CONFIG = """
[auth.openapi.bearer]
bearer = "{token}"

[auth.openapi.APIKeyHeader]
api_key = "{admin_key}"

[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]

"""


def shortened(output: str) -> str:
    """schemathesis' report without the megabyte bodies it quotes, failures first."""
    output = re.sub(r"(.{40})(.{200,}?)(.{40})(?=\n|$)", lambda m: f"{m[1]} …[{len(m[2])} chars]… {m[3]}", output)
    start = output.find("FAILURES")
    return output[start:] if start >= 0 else output[-20_000:]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("role", ROLES)
def test_schemathesis_with_every_check_and_phase_finds_nothing_against_a_running_server(
    served: Served, tmp_path: Path, role: str
) -> None:
    employee = 1001 if role == "technician" else None
    token = issue_token(served.settings, company_id=served.company_ids[0], role=role, employee_id=employee)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(token=token, admin_key=ADMIN_KEY))
    seed = str(random.randrange(2**31)) if SEED == "random" else SEED
    command = [
        str(BIN / "schemathesis"), "--config-file", str(config), "--no-color",
        "run", f"{served.url}/openapi.json",
        "--checks", "all",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", seed,
        "--workers", "1",
        "--request-timeout", "60",
        "--generation-database", "none",
        "--suppress-health-check", "all",
        "--report", "junit", "--report-dir", str(tmp_path / "report"),
    ]
    # The graphql query rule the schema states in words, taught to the generator (see contract_hooks).
    environment = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=1100, cwd=tmp_path, env=environment)
    output = result.stdout + result.stderr
    (tmp_path / "schemathesis.out").write_text(output)
    print(shortened(output))
    assert result.returncode == 0, f"schemathesis (seed {seed}) found problems:\n{shortened(output)}"
    assert "No issues found" in output or "passed" in output
    # Schema-valid company writes were accepted for every connector, graphql included (the hook's rule).
    companies = httpx.get(f"{served.url}/companies", headers={"X-API-Key": ADMIN_KEY}, timeout=30).json()
    created = Counter(company["connector"] for company in companies)
    print(f"schemathesis (seed {seed}, {role}): companies created per connector: {dict(created)}")
    assert set(created) >= {"graphql", "rest", "synthetic"}, created
