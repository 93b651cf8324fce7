"""Planning a job: one ``sync_jobs`` row and one ``sync_tasks`` row per (company, resource,
partition), in ONE transaction with bulk inserts, then one message per task.

Two steps, as the product card draws it: ``create_job`` inserts the job row (``pending``,
its scope and tick key, status "planning") in milliseconds, and the caller sends one
``coordinate_sync`` message; the coordinator actor (``coordinate_job``) plans the tasks and
enqueues them. A request or a scheduler tick never holds the planning transaction.

Built for 10,000 companies × 8 partitions: connectors are built once per distinct config,
tasks go in with COPY on PostgreSQL (executemany on SQLite), and the ids come back with one
SELECT — no round trip per row.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, func, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite

from connectors import registry
from connectors.base import Connector
from pipeline.cleanup import id_in
from pipeline.dispatch import Dispatcher
from pipeline.errors import ConfigError, NotFound
from pipeline.jobs import log
from pipeline.models import JOBS, MODES, PRIORITIES, TASKS, TRIGGERS, Company, utcnow
from pipeline.secrets import redact

OPEN = ("pending", "processing")
# Serialises "read the open partitions, insert the new tasks" across planners (PostgreSQL), so two
# jobs planned at once cannot both miss each other's open task (pg_advisory_xact_lock key text).
PLAN_LOCK = "pipeline:plan-open-tasks"
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


@dataclass(frozen=True, slots=True)
class SubmittedJob:
    """A job row waiting for the ``coordinate_sync`` actor to plan its tasks (status "planning")."""

    job_id: uuid.UUID
    priority: str
    resources: list[str]


@dataclass(frozen=True, slots=True)
class _Scope:
    company_ids: list[int]
    resources: list[str]
    partitions: list[str]

    def as_json(self) -> dict[str, Any]:
        return {"company_ids": self.company_ids, "resources": self.resources, "partitions": self.partitions}

    @classmethod
    def of(cls, company_ids: Sequence[int] | None, resources: Sequence[str] | None,
           partitions: Sequence[str] | None) -> _Scope:
        return cls(list(company_ids or []), sorted(set(resources or [])), sorted(set(partitions or [])))

    @classmethod
    def from_json(cls, value: dict[str, Any] | None) -> _Scope:
        value = value or {}
        return cls.of(value.get("company_ids"), value.get("resources"), value.get("partitions"))


@dataclass
class _Rows:
    rows: list[tuple[int, str, str]]
    per_resource: dict[str, int]
    companies: int
    skipped: list[tuple[int, str, str]]
    broken: list[tuple[int, str]]


def open_partitions(conn: Connection, company_ids: list[int]) -> set[tuple[int, str, str]]:
    """(company, resource, partition) of every task still open, among ``company_ids``."""
    if not company_ids:
        return set()
    rows = conn.execute(
        select(TASKS.c.company_id, TASKS.c.resource, TASKS.c.partition_key)
        .where(TASKS.c.status.in_(OPEN), id_in(conn.engine, TASKS.c.company_id, company_ids))
    ).all()
    return {(row.company_id, row.resource, row.partition_key) for row in rows}


def _validated_priority(trigger: str, mode: str, priority: str | None) -> str:
    if trigger not in TRIGGERS:
        raise ConfigError(f"trigger must be one of {', '.join(TRIGGERS)}, got {trigger!r}")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    priority = priority or ("normal" if trigger == "schedule" else "high")
    if priority not in PRIORITIES:
        raise ConfigError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    return priority


def _company_query() -> Any:
    return select(Company.id, Company.external_id, Company.connector, Company.connector_config,
                  Company.sync_enabled).order_by(Company.id)


def _named_companies(conn: Connection, company_ids: Sequence[int], columns: Any) -> list[Any]:
    """The companies named by id; raises unless every one exists and is enabled."""
    rows = conn.execute(columns.where(id_in(conn.engine, Company.__table__.c.id, company_ids))).all()
    missing = sorted(set(company_ids) - {row.id for row in rows})
    if missing:
        raise NotFound(f"unknown company id(s): {', '.join(map(str, missing))}")
    disabled = [row.id for row in rows if not row.sync_enabled]
    if disabled:
        raise ConfigError(f"sync is disabled for company id(s): {', '.join(map(str, disabled))}")
    return list(rows)


def _scope_companies(conn: Connection, company_ids: Sequence[int] | None) -> list[Any]:
    query = _company_query()
    if company_ids:
        return _named_companies(conn, company_ids, query)
    return list(conn.execute(query.where(Company.sync_enabled.is_(True))).all())


def _build(company_id: int, connector: str, config: dict[str, Any], built: dict[tuple[str, bytes], Connector]
           ) -> Connector:
    config = redact(config)  # planning needs the shape, not the secrets
    cache_key = (connector, orjson.dumps(config, option=orjson.OPT_SORT_KEYS))
    found = built.get(cache_key)
    if found is None:
        try:
            found = built[cache_key] = registry.build(connector, config)
        except ConfigError as exc:
            raise ConfigError(f"company {company_id}: {exc}") from exc
    return found


def _check_resources(wanted: set[str], offered: set[str]) -> None:
    unknown = sorted(wanted - offered)
    if unknown:
        raise ConfigError(f"unknown resource(s): {', '.join(unknown)} (offered: {', '.join(sorted(offered))})")


def _validate_scope(conn: Connection, scope: _Scope) -> None:
    """What the request can be refused for before its job exists: unknown or disabled companies
    named by id, and unknown resources — cheap checks, without listing any partition."""
    if scope.company_ids:
        companies = _named_companies(conn, scope.company_ids, select(Company.id, Company.sync_enabled))
    if not scope.resources:
        return
    # Resources depend only on the connector and its config: one build per distinct pair.
    configs = select(Company.connector, Company.connector_config, func.min(Company.id).label("id")).group_by(
        Company.connector, Company.connector_config)
    if scope.company_ids:
        configs = configs.where(id_in(conn.engine, Company.__table__.c.id, [row.id for row in companies]))
    else:
        configs = configs.where(Company.sync_enabled.is_(True))
    built: dict[tuple[str, bytes], Connector] = {}
    offered: set[str] = set()
    try:
        for row in conn.execute(configs):
            try:
                connector = _build(row.id, row.connector, row.connector_config or {}, built)
            except ConfigError:
                if scope.company_ids:
                    raise
                continue  # planning every company skips one whose config no longer validates
            offered.update(spec.name for spec in connector.resources())
    finally:
        for connector in built.values():
            connector.close()
    if offered:
        _check_resources(set(scope.resources), offered)


def _plan_rows(conn: Connection, scope: _Scope, today: date) -> _Rows:
    """The (company, resource, partition) rows of ``scope``, leaving out partitions that still
    have an open task in another job (whatever triggered either job: defect 7).

    On PostgreSQL this takes ``PLAN_LOCK`` until the caller's transaction ends, so the open
    tasks it reads include every other plan's, committed before it (planners run one at a time;
    a plan is one short transaction).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": PLAN_LOCK})
    companies = _scope_companies(conn, scope.company_ids)
    busy = open_partitions(conn, [company.id for company in companies])
    skipped: list[tuple[int, str, str]] = []
    broken: list[tuple[int, str]] = []
    rows: list[tuple[int, str, str]] = []
    seen_resources: set[str] = set()
    per_resource: dict[str, int] = {}
    wanted_resources = set(scope.resources)
    wanted_partitions = set(scope.partitions)
    built: dict[tuple[str, bytes], Connector] = {}
    try:
        for company in companies:
            try:
                connector = _build(company.id, company.connector, company.connector_config or {}, built)
            except ConfigError as exc:
                if scope.company_ids:
                    raise
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
    finally:
        for connector in built.values():
            connector.close()
    if companies and seen_resources:
        _check_resources(wanted_resources, seen_resources)
    return _Rows(rows, per_resource, len(companies), skipped, broken)


def _insert_job(conn: Connection, values: dict[str, Any], tick_key: str | None) -> bool:
    """Insert the job row; ``False`` when ``tick_key`` was already planned (by another scheduler)."""
    if tick_key is None:
        conn.execute(insert(JOBS).values(**values))
        return True
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    inserted = conn.execute(
        dialect_insert(JOBS).values(**values, tick_key=tick_key)
        .on_conflict_do_nothing(index_elements=["tick_key"]).returning(JOBS.c.id)
    ).first()
    return inserted is not None


def _log_skips(conn: Connection, job_id: uuid.UUID, planned: _Rows) -> None:
    skipped, broken = planned.skipped, planned.broken
    if skipped:
        names = ", ".join(f"{c}/{r}/{p}" for c, r, p in skipped[:LOG_NAMES])
        more = f" and {len(skipped) - LOG_NAMES} more" if len(skipped) > LOG_NAMES else ""
        everything = " (every partition in scope: nothing left to do, the job ends now)" if not planned.rows else ""
        log(conn, job_id, None, "warning",
            f"skipped {len(skipped)} partition(s) that already have an open task in another job{everything}: "
            f"{names}{more}",
            {"event": "skipped_open_partitions", "count": len(skipped),
             "partitions": [f"{c}/{r}/{p}" for c, r, p in skipped[:LOG_NAMES]]})
    for company_id, problem in broken[:LOG_NAMES]:
        log(conn, job_id, None, "error",
            f"company {company_id} skipped: its connector config is invalid: {problem}",
            {"event": "skipped_company", "company_id": company_id})
    if len(broken) > LOG_NAMES:
        log(conn, job_id, None, "error", f"{len(broken) - LOG_NAMES} more companies skipped for invalid configs",
            {"event": "skipped_company", "count": len(broken) - LOG_NAMES})


def _planned_job(job_id: uuid.UUID, task_ids: list[int], planned: _Rows, priority: str) -> PlannedJob:
    return PlannedJob(job_id=job_id, total_tasks=len(task_ids), task_ids=task_ids,
                      resources=sorted(planned.per_resource), priority=priority, companies=planned.companies,
                      partitions_by_resource=planned.per_resource, skipped_open=len(planned.skipped),
                      skipped_companies=[company_id for company_id, _ in planned.broken])


def _store_tasks(conn: Connection, job_id: uuid.UUID, planned: _Rows, now: datetime) -> list[int]:
    """Insert the tasks, log what was skipped and mark the job planned, in the caller's
    transaction; the new task ids."""
    _log_skips(conn, job_id, planned)
    if planned.rows:
        _insert_tasks(conn, job_id, planned.rows, now)
        conn.execute(JOBS.update().where(JOBS.c.id == job_id)
                     .values(total_tasks=len(planned.rows), planned_at=now))
    else:
        # Nothing in scope: the job is trivially complete.
        conn.execute(JOBS.update().where(JOBS.c.id == job_id)
                     .values(status="completed", planned_at=now, started_at=now, completed_at=now))
    return list(conn.execute(select(TASKS.c.id).where(TASKS.c.job_id == job_id).order_by(TASKS.c.id)).scalars())


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
    """Plan a job synchronously and send its messages; ``None`` if ``tick_key`` was already planned.

    The scheduler, ``POST /sync`` and ``pipeline sync`` do not call this: they ``create_job`` and
    let the ``coordinate_sync`` actor plan. It stays for embedding, tests and the benchmarks
    that time planning itself.

    Parameters:
        trigger: "schedule", "api" or "cli".
        company_ids / resources / partitions: narrow the scope; unknown ones are errors.
        priority: "high" or "normal"; defaults to high for people (api, cli), normal for the schedule.
        tick_key: unique per scheduler tick, so two schedulers plan one job per tick.

    A job, whatever its trigger (schedule, ``POST /sync``, ``pipeline sync``), gives a partition
    that already has an open task (pending or processing, in any job) no second one: two open
    tasks of one partition would both publish, the last commit winning whatever its data's age
    (defect 7). The open task is left to finish (skipped, not superseded: it may be far along,
    and it fetches the upstream as it is now). The job's log names the skipped partitions and
    counts them; a job whose every partition was skipped is completed at once with no task.
    ``retry_job`` follows the same rule under the same lock. Should two open tasks of one
    partition ever meet, publishing compare-and-swaps on the version the lineage started from,
    so stale data never lands on top of newer data. When planning
    every company, one whose stored config no longer validates is skipped and named in the
    log instead of aborting the job for every tenant (defect 11). The same holds for the
    coordinator (``coordinate_job``).

    Raises:
        NotFound: an unknown company id.
        ConfigError: an unknown resource or mode, a disabled company asked for by id, or a
            company asked for by id whose config does not validate.
    """
    priority = _validated_priority(trigger, mode, priority)
    scope = _Scope.of(company_ids, resources, partitions)
    job_id = uuid.uuid4()
    now = utcnow()
    with engine.begin() as conn:
        planned = _plan_rows(conn, scope, today or now.date())
        values = {"id": job_id, "trigger": trigger, "mode": mode, "priority": priority, "status": "pending",
                  "scope": scope.as_json(), "total_tasks": 0, "created_at": now}
        if not _insert_job(conn, values, tick_key):
            return None
        task_ids = _store_tasks(conn, job_id, planned, now)
    if dispatcher is not None and task_ids:
        dispatcher.enqueue(task_ids, priority=priority)
    return _planned_job(job_id, task_ids, planned, priority)


def create_job(
    conn: Connection,
    *,
    trigger: str,
    mode: str = "full",
    company_ids: Sequence[int] | None = None,
    resources: Sequence[str] | None = None,
    partitions: Sequence[str] | None = None,
    priority: str | None = None,
    tick_key: str | None = None,
) -> SubmittedJob | None:
    """Insert a ``pending`` job with its scope, unplanned, in the caller's transaction.

    The caller sends ``coordinate_sync(job_id)`` after committing (``Dispatcher.coordinate``);
    the coordinator plans the tasks. Only cheap checks run here (companies named by id,
    resources named), so this takes milliseconds whatever the number of companies.
    Returns ``None`` if ``tick_key`` was already submitted (one job per scheduler tick).

    Raises:
        NotFound: an unknown company id.
        ConfigError: an unknown resource, mode, trigger or priority, or a disabled company asked for by id.
    """
    priority = _validated_priority(trigger, mode, priority)
    scope = _Scope.of(company_ids, resources, partitions)
    _validate_scope(conn, scope)
    job_id = uuid.uuid4()
    values = {"id": job_id, "trigger": trigger, "mode": mode, "priority": priority, "status": "pending",
              "scope": scope.as_json(), "total_tasks": 0, "created_at": utcnow()}
    if not _insert_job(conn, values, tick_key):
        return None
    return SubmittedJob(job_id=job_id, priority=priority, resources=scope.resources)


def coordinate_job(engine: Engine, dispatcher: Dispatcher | None, job_id: uuid.UUID, *,
                   today: date | None = None) -> PlannedJob | None:
    """The coordinator's work: plan a submitted job's tasks in one transaction, then send them.

    Safe to run twice or concurrently for one job (a redelivered or duplicated message, a
    coordinator killed mid-plan and retried): the job row is locked for the plan, and a job
    already planned is left alone — tasks whose message a dead coordinator never sent are
    re-sent by the sweeper, like any lost message. A scope that no longer plans (a company
    disabled or removed meanwhile, a resource no longer offered) fails the job with a message
    naming it. Returns ``None`` when nothing was planned (no such job, already planned,
    finished or cancelled, or failed).
    """
    now = utcnow()
    with engine.begin() as conn:
        job = conn.execute(select(JOBS).where(JOBS.c.id == job_id).with_for_update()).one_or_none()
        if job is None or job.status not in ("pending", "processing"):
            return None
        if job.planned_at is not None:
            return None
        try:
            planned = _plan_rows(conn, _Scope.from_json(job.scope), today or now.date())
        except (ConfigError, NotFound) as exc:
            conn.execute(JOBS.update().where(JOBS.c.id == job_id).values(
                status="failed", planned_at=now, completed_at=now, error_message=f"planning failed: {exc}"))
            return None
        task_ids = _store_tasks(conn, job_id, planned, now)
    if dispatcher is not None and task_ids:
        dispatcher.enqueue(task_ids, priority=job.priority)
    return _planned_job(job_id, task_ids, planned, job.priority)


def _insert_tasks(conn: Connection, job_id: uuid.UUID, rows: list[tuple[int, str, str]], now: Any) -> None:
    if conn.dialect.name == "postgresql":
        # COPY through psycopg, which quotes and escapes each value itself (write_row).
        raw = conn.connection.dbapi_connection
        assert raw is not None
        with raw.cursor() as cursor:  # type: ignore[attr-defined]
            with cursor.copy(
                "COPY sync_tasks (job_id, company_id, resource, partition_key, status, attempts, chunks, "
                "record_count, created_at, updated_at) FROM STDIN"
            ) as copy:
                for company_id, resource, partition in rows:
                    copy.write_row((job_id, company_id, resource, partition, "pending", 0, 0, 0, now, now))
        return
    conn.execute(insert(TASKS), [
        {"job_id": job_id, "company_id": company_id, "resource": resource, "partition_key": partition,
         "status": "pending", "attempts": 0, "chunks": 0, "record_count": 0, "created_at": now, "updated_at": now}
        for company_id, resource, partition in rows
    ])
