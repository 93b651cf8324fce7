"""The migrations build exactly the schema the models declare, on PostgreSQL and on SQLite."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import (
    CheckConstraint,
    Engine,
    ForeignKeyConstraint,
    MetaData,
    UniqueConstraint,
    delete,
    func,
    inspect,
    select,
)
from sqlalchemy.exc import IntegrityError

from pipeline import migrate
from pipeline.db import make_engine, transaction
from pipeline.models import Base, Company, Dataset, JobLog, SyncCursor, SyncJob, SyncTask

REPO_ROOT = Path(__file__).resolve().parents[2]

Schema = dict[str, dict[str, Any]]


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a brand-new, empty database (never migrated)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pipeline.db'}"
    make_database: Callable[[], str] = request.getfixturevalue("make_database")
    return make_database()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The application's engine on the database, migrated to head (SQLite foreign keys on)."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def reflected_schema(engine: Engine) -> Schema:
    """Tables, columns, and the names of every constraint and index, as the database reports them."""
    inspector = inspect(engine)
    schema: Schema = {}
    for table in inspector.get_table_names():
        schema[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            "primary_key": inspector.get_pk_constraint(table)["name"],
            "unique": sorted(str(u["name"]) for u in inspector.get_unique_constraints(table)),
            "check": sorted(str(c["name"]) for c in inspector.get_check_constraints(table)),
            "foreign_keys": sorted(
                (str(fk["name"]), fk["referred_table"], fk["options"].get("ondelete"))
                for fk in inspector.get_foreign_keys(table)
            ),
            "indexes": sorted(
                str(i["name"]) for i in inspector.get_indexes(table) if "duplicates_constraint" not in i
            ),
        }
    return schema


def declared_names(metadata: MetaData) -> Schema:
    """The same names as :func:`reflected_schema`, as the models declare them."""
    declared: Schema = {}
    for table in metadata.sorted_tables:
        constraints = table.constraints
        declared[table.name] = {
            "primary_key": table.primary_key.name,
            "unique": sorted(str(c.name) for c in constraints if isinstance(c, UniqueConstraint)),
            "check": sorted(str(c.name) for c in constraints if isinstance(c, CheckConstraint)),
            "foreign_keys": sorted(
                (str(c.name), c.referred_table.name, c.ondelete.upper() if c.ondelete else None)
                for c in constraints
                if isinstance(c, ForeignKeyConstraint)
            ),
            "indexes": sorted(str(i.name) for i in table.indexes),
        }
    return declared


def differences_from_models(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, Base.metadata))


def add_company_job_and_task(engine: Engine) -> tuple[int, uuid.UUID]:
    with transaction(engine) as session:
        company = Company(name="Acme", connector="synthetic")
        job = SyncJob(trigger="cli")
        session.add_all([company, job])
        session.flush()
        task = SyncTask(job_id=job.id, company_id=company.id, resource="shifts", partition_key="2025-01-01")
        session.add(task)
        session.flush()
        session.add(JobLog(job_id=job.id, task_id=task.id, level="info", message="claimed"))
        session.add(
            Dataset(
                company_id=company.id,
                resource="shifts",
                partition_key="2025-01-01",
                storage_key="1/shifts/2025-01-01/ab.json",
                checksum_sha256="ab" * 32,
                size_bytes=2,
                record_count=0,
            )
        )
        session.add(SyncCursor(company_id=company.id, resource="shifts", partition_key="*", bookmark="b1"))
        return company.id, job.id


def count(engine: Engine, model: type[Base]) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(model)).scalar_one()


def test_a_database_never_migrated_has_no_current_revision(database_url: str) -> None:
    assert migrate.current(database_url) is None


def test_upgrade_creates_every_table_the_models_declare(database_url: str, engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    assert migrate.current(database_url) == migrate.head()


def test_upgrade_names_every_constraint_and_index_like_the_models(engine: Engine) -> None:
    reflected = reflected_schema(engine)
    for table, names in declared_names(Base.metadata).items():
        assert {key: reflected[table][key] for key in names} == names, table


def test_migrated_schema_does_not_differ_from_the_models(engine: Engine) -> None:
    assert differences_from_models(engine) == []


def test_status_check_rejects_an_unknown_status(engine: Engine) -> None:
    with pytest.raises(IntegrityError, match="status_valid"), transaction(engine) as session:
        session.add(SyncJob(trigger="cli", status="bogus"))


def test_trigger_check_rejects_an_unknown_trigger(engine: Engine) -> None:
    with pytest.raises(IntegrityError, match="trigger_valid"), transaction(engine) as session:
        session.add(SyncJob(trigger="cron"))


def test_a_task_is_unique_per_job_company_resource_and_partition(engine: Engine) -> None:
    company_id, job_id = add_company_job_and_task(engine)
    with pytest.raises(IntegrityError), transaction(engine) as session:
        session.add(
            SyncTask(job_id=job_id, company_id=company_id, resource="shifts", partition_key="2025-01-01")
        )


def test_deleting_a_job_cascades_to_its_tasks_and_log(engine: Engine) -> None:
    add_company_job_and_task(engine)
    with transaction(engine) as session:
        session.execute(delete(SyncJob))
    assert (count(engine, SyncTask), count(engine, JobLog)) == (0, 0)
    assert (count(engine, Company), count(engine, Dataset)) == (1, 1)


def test_deleting_a_company_cascades_to_its_tasks_datasets_and_cursors(engine: Engine) -> None:
    add_company_job_and_task(engine)
    with transaction(engine) as session:
        session.execute(delete(Company))
    assert [count(engine, model) for model in (SyncTask, JobLog, Dataset, SyncCursor)] == [0, 0, 0, 0]
    assert count(engine, SyncJob) == 1


def test_upgrading_twice_changes_nothing(database_url: str, engine: Engine) -> None:
    add_company_job_and_task(engine)
    before = reflected_schema(engine)
    migrate.upgrade(database_url)
    assert reflected_schema(engine) == before
    assert migrate.current(database_url) == migrate.head()
    assert count(engine, SyncTask) == 1


def test_downgrade_to_base_drops_every_table_and_upgrade_restores_them(
    database_url: str, engine: Engine
) -> None:
    migrate.downgrade(database_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    assert migrate.current(database_url) is None

    migrate.upgrade(database_url)
    assert differences_from_models(engine) == []


def test_concurrent_upgrades_of_an_empty_database_all_succeed(database_url: str) -> None:
    """Like `docker compose up` starting `pipeline migrate` next to workers that migrate too."""
    script = "import sys; from pipeline.migrate import upgrade; upgrade(sys.argv[1])"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, database_url],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * len(processes), outputs
    assert migrate.current(database_url) == migrate.head()


def test_config_passes_a_url_with_percent_escapes_through_unchanged() -> None:
    url = "postgresql://user:p%40ss%25word@db:5432/pipeline"
    config = migrate.alembic_config(url)
    assert config.get_main_option("sqlalchemy.url") == url
    assert Path(str(config.get_main_option("script_location")), "env.py").is_file()
