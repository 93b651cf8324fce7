"""Planning a job: one ``sync_jobs`` row and one ``sync_tasks`` row per (company, resource,
partition), in ONE transaction with bulk inserts, then one message per task.

Built for 10,000 companies × 8 partitions: connectors are built once per distinct config,
tasks go in with COPY on PostgreSQL (executemany on SQLite), and the ids come back with one
SELECT — no round trip per row.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from connectors import registry
from connectors.base import Connector
from pipeline.cleanup import id_in
from pipeline.dispatch import Dispatcher
from pipeline.errors import ConfigError, NotFound
from pipeline.jobs import log
from pipeline.models import JOBS, MODES, PRIORITIES, TASKS, TRIGGERS, Company, utcnow

OPEN = ("pending", "processing")
# How many skipped partitions or companies a job's log names one by one.
LOG_NAMES = 20


@dataclass(frozen=True, slots=True)
class PlannedJob:
    job_id: uuid.UUID
    total_tasks: int
    task_ids: list[int]
    resources: list[str]
    priority: str
    companies: int = 0
    partitions_by_resource: dict[str, int] = field(default_factory=dict)
    skipped_open: int = 0
    skipped_companies: list[int] = field(default_factory=list)


def _open_partitions(conn: Connection, company_ids: list[int]) -> set[tuple[int, str, str]]:
    """(company, resource, partition) of every task still open, among ``company_ids``."""
    if not company_ids:
        return set()
    rows = conn.execute(
        select(TASKS.c.company_id, TASKS.c.resource, TASKS.c.partition_key)
        .where(TASKS.c.status.in_(OPEN), id_in(conn.engine, TASKS.c.company_id, company_ids))
    ).all()
    return {(row.company_id, row.resource, row.partition_key) for row in rows}


def _scope_companies(conn: Connection, company_ids: Sequence[int] | None) -> list[Any]:
    query = select(Company.id, Company.external_id, Company.connector, Company.connector_config,
                   Company.sync_enabled).order_by(Company.id)
    if company_ids:
        rows = conn.execute(query.where(id_in(conn.engine, Company.__table__.c.id, company_ids))).all()
        missing = sorted(set(company_ids) - {row.id for row in rows})
        if missing:
            raise NotFound(f"unknown company id(s): {', '.join(map(str, missing))}")
        disabled = [row.id for row in rows if not row.sync_enabled]
        if disabled:
            raise ConfigError(f"sync is disabled for company id(s): {', '.join(map(str, disabled))}")
        return list(rows)
    return list(conn.execute(query.where(Company.sync_enabled.is_(True))).all())


def plan_job(
    engine: Engine,
    dispatcher: Dispatcher | None,
    *,
    trigger: str,
    mode: str = "full",
    company_ids: Sequence[int] | None = None,
    resources: Sequence[str] | None = None,
    partitions: Sequence[str] | None = None,
    priority: str | None = None,
    tick_key: str | None = None,
    today: date | None = None,
) -> PlannedJob | None:
    """Plan a job and send its messages; returns ``None`` if ``tick_key`` was already planned.

    Parameters:
        trigger: "schedule", "api" or "cli".
        company_ids / resources / partitions: narrow the scope; unknown ones are errors.
        priority: "high" or "normal"; defaults to high for people (api, cli), normal for the schedule.
        tick_key: unique per scheduler tick, so two schedulers plan one job per tick.

    A scheduled job gives a partition that already has an open task (pending or processing,
    in any job) no second one: two open tasks of one partition would both publish (defect 7).
    The job's log says which were skipped. Where two open tasks of one partition still meet
    (a person's sync overlapping a tick), publishing compare-and-swaps on the version the
    lineage started from, so stale data never lands on top of newer data. When planning
    every company, one whose stored config no longer validates is skipped and named in the
    log instead of aborting the job for every tenant (defect 11).

    Raises:
        NotFound: an unknown company id.
        ConfigError: an unknown resource or mode, a disabled company asked for by id, or a
            company asked for by id whose config does not validate.
    """
    if trigger not in TRIGGERS:
        raise ConfigError(f"trigger must be one of {', '.join(TRIGGERS)}, got {trigger!r}")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    priority = priority or ("normal" if trigger == "schedule" else "high")
    if priority not in PRIORITIES:
        raise ConfigError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    today = today or utcnow().date()
    wanted_resources = set(resources or [])
    wanted_partitions = set(partitions or [])
    job_id = uuid.uuid4()
    now = utcnow()

    with engine.begin() as conn:
        companies = _scope_companies(conn, company_ids)
        # A tick skips partitions still open from an earlier job; people's syncs are planned
        # regardless (they asked now) and serialise at publish instead (compare-and-swap).
        busy = _open_partitions(conn, [company.id for company in companies]) if trigger == "schedule" else set()
        skipped: list[tuple[int, str, str]] = []
        broken: list[tuple[int, str]] = []
        rows: list[tuple[int, str, str]] = []
        seen_resources: set[str] = set()
        per_resource: dict[str, int] = {}
        built: dict[tuple[str, bytes], Connector] = {}
        for company in companies:
            config = company.connector_config or {}
            cache_key = (company.connector, orjson.dumps(config, option=orjson.OPT_SORT_KEYS))
            connector = built.get(cache_key)
            if connector is None:
                try:
                    connector = built[cache_key] = registry.build(company.connector, config)
                except ConfigError as exc:
                    if company_ids:
                        raise ConfigError(f"company {company.id}: {exc}") from exc
                    broken.append((company.id, str(exc)))
                    continue
            for spec in connector.resources():
                seen_resources.add(spec.name)
                if wanted_resources and spec.name not in wanted_resources:
                    continue
                for partition in connector.partitions(spec.name, today):
                    if wanted_partitions and partition not in wanted_partitions:
                        continue
                    if (company.id, spec.name, partition) in busy:
                        skipped.append((company.id, spec.name, partition))
                        continue
                    rows.append((company.id, spec.name, partition))
                    per_resource[spec.name] = per_resource.get(spec.name, 0) + 1
        for connector in built.values():
            connector.close()
        unknown = sorted(wanted_resources - seen_resources)
        if unknown and companies:
            offered = ", ".join(sorted(seen_resources))
            raise ConfigError(f"unknown resource(s): {', '.join(unknown)} (offered: {offered})")

        scope = {"company_ids": list(company_ids or []), "resources": sorted(wanted_resources),
                 "partitions": sorted(wanted_partitions)}
        job_values = {"id": job_id, "trigger": trigger, "mode": mode, "priority": priority, "status": "pending",
                      "scope": scope, "tick_key": tick_key, "total_tasks": len(rows), "created_at": now}
        if tick_key is None:
            conn.execute(insert(JOBS).values(**job_values))
        else:
            dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            inserted = conn.execute(
                dialect_insert(JOBS).values(**job_values)
                .on_conflict_do_nothing(index_elements=["tick_key"]).returning(JOBS.c.id)
            ).first()
            if inserted is None:
                return None
        if rows:
            _insert_tasks(conn, job_id, rows, now)
        else:
            # Nothing in scope: the job is trivially complete.
            conn.execute(JOBS.update().where(JOBS.c.id == job_id)
                         .values(status="completed", started_at=now, completed_at=now))
        task_ids = list(conn.execute(select(TASKS.c.id).where(TASKS.c.job_id == job_id).order_by(TASKS.c.id))
                        .scalars())
        if skipped:
            names = ", ".join(f"{c}/{r}/{p}" for c, r, p in skipped[:LOG_NAMES])
            more = f" and {len(skipped) - LOG_NAMES} more" if len(skipped) > LOG_NAMES else ""
            log(conn, job_id, None, "warning",
                f"skipped {len(skipped)} partition(s) that already have an open task in another job: {names}{more}",
                {"event": "skipped_open_partitions", "count": len(skipped)})
        for company_id, problem in broken[:LOG_NAMES]:
            log(conn, job_id, None, "error",
                f"company {company_id} skipped: its connector config is invalid: {problem}",
                {"event": "skipped_company", "company_id": company_id})
        if len(broken) > LOG_NAMES:
            log(conn, job_id, None, "error", f"{len(broken) - LOG_NAMES} more companies skipped for invalid configs",
                {"event": "skipped_company", "count": len(broken) - LOG_NAMES})

    if dispatcher is not None and task_ids:
        dispatcher.enqueue(task_ids, priority=priority)
    return PlannedJob(job_id=job_id, total_tasks=len(task_ids), task_ids=task_ids,
                      resources=sorted(per_resource), priority=priority, companies=len(companies),
                      partitions_by_resource=per_resource, skipped_open=len(skipped),
                      skipped_companies=[company_id for company_id, _ in broken])


def _insert_tasks(conn: Connection, job_id: uuid.UUID, rows: list[tuple[int, str, str]], now: Any) -> None:
    if conn.dialect.name == "postgresql":
        buffer = io.StringIO()
        stamp = now.isoformat()
        job = str(job_id)
        for company_id, resource, partition in rows:
            buffer.write(f"{job}\t{company_id}\t{_copy_text(resource)}\t{_copy_text(partition)}"
                         f"\tpending\t0\t0\t0\t{stamp}\t{stamp}\n")
        raw = conn.connection.dbapi_connection
        assert raw is not None
        with raw.cursor() as cursor:  # type: ignore[attr-defined]
            with cursor.copy(
                "COPY sync_tasks (job_id, company_id, resource, partition_key, status, attempts, chunks, "
                "record_count, created_at, updated_at) FROM STDIN"
            ) as copy:
                copy.write(buffer.getvalue())
        return
    conn.execute(insert(TASKS), [
        {"job_id": job_id, "company_id": company_id, "resource": resource, "partition_key": partition,
         "status": "pending", "attempts": 0, "chunks": 0, "record_count": 0, "created_at": now, "updated_at": now}
        for company_id, resource, partition in rows
    ])


def _copy_text(value: str) -> str:
    if any(ch in value for ch in "\\\t\n\r"):
        raise ConfigError(f"partition or resource name contains a control character: {value!r}")
    return value
