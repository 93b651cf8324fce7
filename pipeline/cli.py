"""The ``pipeline`` command line (Typer). The edge: settings are read here, once."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pipeline.errors import PipelineError
from pipeline.preflight import check_broker, check_schema, explain
from pipeline.progress import JobProgress
from pipeline.runtime import Runtime
from pipeline.settings import Settings, load_settings

if TYPE_CHECKING:
    import dramatiq

SERVICE_EXIT_CODE = 3
"""Exit code when a service is unreachable, refuses our credentials or is not migrated (2: bad
input, 1: a job failed)."""


class PipelineApp(typer.Typer):
    """The Typer app with one error handler for every command, including those added later: a
    failure of a service we depend on (database, schema, RabbitMQ, S3) or any error of our tree
    ends as one line on stderr and a non-zero exit, never a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            code = exit_for(exc)
            if code is None:
                raise
            sys.exit(code)


app = PipelineApp(help="Multi-tenant sync pipeline with blob-stored results.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
company_app = typer.Typer(help="Manage companies (tenants).", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect, cancel and retry sync jobs.", no_args_is_help=True)
secrets_app = typer.Typer(help="Tenant secrets encrypted at rest (PIPELINE_SECRETS_KEY).", no_args_is_help=True)
app.add_typer(company_app, name="company")
app.add_typer(jobs_app, name="jobs")
app.add_typer(secrets_app, name="secrets")

out = Console()
err = Console(stderr=True)
T = TypeVar("T")


def fail(message: str, code: int = 2) -> typer.Exit:
    # Plain text (a message may hold "[...]"), never wrapped: one line whatever the terminal width.
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _settings_or_none() -> Settings | None:
    try:
        return load_settings()
    except PipelineError:
        return None


def exit_for(exc: BaseException) -> int | None:
    """Print the one line for ``exc`` and return the exit code, or ``None`` when ``exc`` is not a
    service failure nor one of our errors (then it is a bug, and its traceback is wanted)."""
    if isinstance(exc, typer.Exit | SystemExit | KeyboardInterrupt):
        return None
    explained = explain(exc, _settings_or_none())
    if explained is not None:
        return fail(explained, SERVICE_EXIT_CODE).exit_code
    if isinstance(exc, PipelineError):
        return fail(str(exc)).exit_code
    return None


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Turn our errors and service failures into one readable line and a non-zero exit, never a traceback."""
    try:
        yield
    except Exception as exc:
        code = exit_for(exc)
        if code is None:
            raise
        raise typer.Exit(code) from None


def settings() -> Settings:
    with errors_to_exit():
        return load_settings()


@contextmanager
def runtime(*, broker: bool = False) -> Iterator[Runtime]:
    """The runtime of a command: the store reached, the database reached and at the schema head,
    and with ``broker`` RabbitMQ reached too (when one is configured)."""
    with errors_to_exit():
        rt = Runtime.from_settings(load_settings())
    try:
        with errors_to_exit():
            check_schema(rt.engine, rt.settings)
            if broker:
                check_broker(rt.settings)
    except BaseException:
        rt.close()
        raise
    try:
        with errors_to_exit():
            yield rt
    finally:
        rt.close()


def preflight(s: Settings) -> None:
    """For long-running commands: every service reached and the schema current before starting,
    so a wrong setting fails now, in the foreground, not in a child process or at the first tick."""
    with runtime(broker=True):
        pass


def check_secrets_key(s: Settings) -> None:
    """Components that decrypt tenants' secrets (workers; the API, to keep them on update) stop
    at start-up, naming ``PIPELINE_SECRETS_KEY``, when it is missing or opens no stored secret.

    Runs after ``preflight``; should the database stop answering in between, the check is
    skipped with a warning, and a task that cannot decrypt fails naming the setting.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from pipeline.db import make_engine
    from pipeline.secrets import SecretBox, check_stored_secrets

    with errors_to_exit():
        engine = make_engine(s.database_url)
        try:
            check_stored_secrets(engine, SecretBox.from_settings(s))
        except SQLAlchemyError as exc:
            err.print(f"warning: stored secrets not checked: the database did not answer ({type(exc).__name__})")
        finally:
            engine.dispose()


def parse_json(value: str, what: str) -> Any:
    """Parse JSON given inline or as ``@path``; a clear error names what was bad."""
    text = value
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text()
        except OSError as exc:
            raise fail(f"cannot read {what} file {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


@app.command()
def migrate() -> None:
    """Upgrade the database schema to the latest version (safe to run twice)."""
    from pipeline.migrate import upgrade

    s = settings()
    with errors_to_exit():
        upgrade(s.database_url)
    err.print("database is at the latest schema version")


@company_app.command("add")
def company_add(
    name: str,
    connector: Annotated[str, typer.Option(help="Connector name, e.g. synthetic or rest.")],
    config: Annotated[str, typer.Option(help="Connector config as JSON, or @FILE.")] = "{}",
    toggles: Annotated[str, typer.Option(help="Feature toggles as JSON.")] = "{}",
    external_id: Annotated[str | None, typer.Option(help="The company's id upstream.")] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="Create with sync disabled.")] = False,
) -> None:
    """Add a company; prints its id. The config is validated before anything is stored."""
    from pipeline.companies import add_company

    parsed_config = parse_json(config, "--config")
    parsed_toggles = parse_json(toggles, "--toggles")
    with runtime() as rt:
        company = add_company(rt.engine, name=name, connector=connector, config=parsed_config,
                              toggles=parsed_toggles, external_id=external_id, enabled=not disabled,
                              context=rt.connector_context, secrets=rt.secrets)
    out.print(company.id)


@company_app.command("list")
def company_list() -> None:
    """List companies."""
    from pipeline.companies import list_companies

    with runtime() as rt:
        companies = list_companies(rt.engine)
    table = Table("id", "name", "external id", "connector", "sync", "toggles")
    for c in companies:
        table.add_row(str(c.id), c.name, c.external_id or "", c.connector, "on" if c.sync_enabled else "off",
                      json.dumps(c.feature_toggles, sort_keys=True))
    out.print(table)


@company_app.command("show")
def company_show(company_id: int) -> None:
    """Print one company as JSON; its secrets show as "***"."""
    from pipeline.companies import get_company
    from pipeline.secrets import redact

    with runtime() as rt:
        c = get_company(rt.engine, company_id)
    out.print_json(json.dumps({
        "id": c.id, "name": c.name, "external_id": c.external_id, "connector": c.connector,
        "enabled": c.sync_enabled, "config": redact(c.connector_config or {}), "toggles": c.feature_toggles or {},
    }), highlight=False)


@secrets_app.command("keygen")
def secrets_keygen() -> None:
    """Print a new Fernet key: put it FIRST in PIPELINE_SECRETS_KEY, then run `pipeline secrets rotate`."""
    from cryptography.fernet import Fernet

    out.print(Fernet.generate_key().decode(), highlight=False)


@secrets_app.command("rotate")
def secrets_rotate() -> None:
    """Re-encrypt every stored secret under the first key of PIPELINE_SECRETS_KEY (one transaction).

    Afterwards the other keys can be removed from PIPELINE_SECRETS_KEY.
    """
    from pipeline.secrets import rotate_stored_secrets

    with runtime() as rt:
        count, companies = rotate_stored_secrets(rt.engine, rt.secrets)
    err.print(f"re-encrypted {count} secret(s) of {companies} company(ies) under the first key")


@company_app.command("set-toggles")
def company_set_toggles(company_id: int, toggles: str) -> None:
    """Replace a company's feature toggles (JSON object of booleans)."""
    from pipeline.companies import update_company

    parsed = parse_json(toggles, "toggles")
    with runtime() as rt:
        update_company(rt.engine, company_id, toggles=parsed)
    err.print(f"toggles of company {company_id} updated")


@company_app.command("set-config")
def company_set_config(company_id: int, config: str) -> None:
    """Replace a company's connector config (JSON or @FILE); validated first."""
    from pipeline.companies import update_company

    parsed = parse_json(config, "config")
    with runtime() as rt:
        update_company(rt.engine, company_id, config=parsed, context=rt.connector_context, secrets=rt.secrets)
    err.print(f"config of company {company_id} updated (secrets it omits are kept)")


@company_app.command("enable")
def company_enable(company_id: int, off: Annotated[bool, typer.Option("--off")] = False) -> None:
    """Enable (or with --off, disable) syncing a company."""
    from pipeline.companies import update_company

    with runtime() as rt:
        update_company(rt.engine, company_id, enabled=not off)
    err.print(f"sync {'disabled' if off else 'enabled'} for company {company_id}")


def progress_printer(progress: Progress, total_hint: int) -> Callable[[JobProgress], None]:
    bar = progress.add_task("sync", total=total_hint or 1)

    def show(p: JobProgress) -> None:
        eta = p.eta_seconds()
        eta_text = "eta --" if eta is None else f"eta {eta:.0f}s"
        progress.update(bar, total=max(p.total_tasks, 1), completed=p.done_tasks,
                        description=f"{p.status} · {p.failed_tasks} failed · {p.processed_records} records · "
                                    f"{eta_text}")

    return show


def make_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)


def report_finished(p: JobProgress) -> None:
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(p.status, "white")
    err.print(f"job {p.job_id} [{colour}]{p.status}[/]: {p.completed_tasks} completed, {p.failed_tasks} failed, "
              f"{p.cancelled_tasks} cancelled, {p.processed_records} records" + (f" — {p.error}" if p.error else ""))


def run_sync(
    rt: Runtime,
    *,
    companies: list[int] | None,
    resources: list[str] | None,
    partitions: list[str] | None,
    mode: str,
    wait: bool,
    trigger: str = "cli",
) -> JobProgress | None:
    """Submit a job to the coordinator; on the embedded default run it in-process, else optionally wait for it."""
    from actors.broker import make_broker
    from actors.tasks import declare_actors
    from pipeline.planning import create_job

    if not rt.settings.broker_url:
        check_secrets_key(rt.settings)  # the tasks run in this process
    broker = make_broker(rt.settings)
    actors = declare_actors(broker, rt)
    try:
        with rt.engine.begin() as conn:
            submitted = create_job(conn, trigger=trigger, mode=mode, company_ids=companies, resources=resources,
                                   partitions=partitions)
        assert submitted is not None  # no tick key: never a duplicate
        actors.coordinate(submitted.job_id, priority=submitted.priority)
        out.print(str(submitted.job_id))
        err.print(f"submitted job {submitted.job_id}: the coordinator plans its tasks")
        if rt.settings.broker_url and not wait:
            return None
        return watch_job(rt, broker, submitted.job_id, total_hint=0)
    finally:
        broker.close()


def watch_job(rt: Runtime, broker: dramatiq.Broker, job_id: uuid.UUID, *, total_hint: int) -> JobProgress:
    """Show a job's progress until it ends: from the LISTEN/NOTIFY feed on PostgreSQL (polling on
    SQLite); on the embedded default the job runs in an in-process worker meanwhile."""
    from actors.inprocess import running_worker
    from pipeline.events import wait_for_job_events
    from pipeline.progress import wait_for_job

    with make_progress() as progress:
        show = progress_printer(progress, total_hint)
        if rt.settings.broker_url:
            final = wait_for_job_events(rt.engine, job_id, on_progress=show)
        else:
            with running_worker(broker, threads=rt.settings.worker_threads):
                final = wait_for_job(rt.engine, job_id, on_progress=show, interval_s=0.1)
    report_finished(final)
    return final


@app.command()
def sync(
    company: Annotated[list[int] | None, typer.Option("--company", help="Company id (repeatable).")] = None,
    resource: Annotated[list[str] | None, typer.Option("--resource", help="Resource (repeatable).")] = None,
    partition: Annotated[list[str] | None, typer.Option("--partition", help="Partition (repeatable).")] = None,
    mode: Annotated[str, typer.Option(help="full or incremental.")] = "full",
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until the job ends.")] = False,
) -> None:
    """Start a sync now; prints the job id. Without a broker it runs in-process and waits."""
    with runtime(broker=True) as rt:
        final = run_sync(rt, companies=company, resources=resource, partitions=partition, mode=mode, wait=wait)
    if final is not None and final.status != "completed":
        raise typer.Exit(1)


@app.command()
def worker(
    processes: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 2,
    threads: Annotated[int | None, typer.Option(min=1, max=64, help="Threads per process.")] = None,
) -> None:
    """Run a worker fleet on the RabbitMQ broker (Dramatiq; SIGTERM finishes the chunk in hand)."""
    s = settings()
    if not s.broker_url:
        raise fail("PIPELINE_BROKER_URL is not set: workers need RabbitMQ (the embedded default runs "
                   "work inside `pipeline sync` / `pipeline demo`)")
    preflight(s)
    threads = threads or s.worker_threads
    check_secrets_key(s)
    # Long tasks: each process prefetches no more messages than it has threads (Dramatiq reads
    # this variable when it is first imported).
    os.environ["dramatiq_queue_prefetch"] = str(threads)
    import dramatiq.cli  # after the variable is set: Dramatiq reads it when first imported

    args = dramatiq.cli.make_argument_parser().parse_args(  # type: ignore[no-untyped-call]
        ["actors.worker", "--processes", str(processes), "--threads", str(threads)]
    )
    metrics_dir = None
    if s.metrics_port:
        # prometheus_client picks multiprocess mode when first imported: name the directory
        # before anything imports it, so every worker process forked below writes there, and
        # this process serves their sum (see actors/middleware.py).
        metrics_dir = tempfile.mkdtemp(prefix="pipeline-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        from actors.middleware import serve_fleet_metrics

        serve_fleet_metrics(s.metrics_port, metrics_dir)
        err.print(f"worker metrics on http://0.0.0.0:{s.metrics_port}/metrics")
    try:
        code = dramatiq.cli.main(args)  # type: ignore[no-untyped-call]
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    sys.exit(code)


@app.command()
def scheduler() -> None:
    """Run the coordinator: hourly plan (SCHEDULE_CRON), sweeper every minute, daily cleanup."""
    from actors.broker import make_broker
    from actors.tasks import declare_actors
    from pipeline.scheduler import build_scheduler

    with runtime(broker=True) as rt:
        broker = make_broker(rt.settings)
        if not rt.settings.broker_url:
            raise fail("PIPELINE_BROKER_URL is not set: the scheduler hands work to RabbitMQ workers")
        sched = build_scheduler(rt, declare_actors(broker, rt))
        err.print(f"scheduler running: sync on '{rt.settings.schedule_cron}' (UTC), sweeper every minute, "
                  "cleanup daily at 03:17 UTC")
        try:
            sched.start()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            broker.close()


@app.command("sweep")
def sweep_once() -> None:
    """Re-send tasks whose lease expired or whose message was lost (the scheduler does this every minute)."""
    from actors.broker import make_broker
    from actors.tasks import declare_actors
    from pipeline.sweeper import sweep

    with runtime(broker=True) as rt:
        broker = make_broker(rt.settings)
        try:
            report = sweep(rt.engine, declare_actors(broker, rt), pending_grace_s=rt.settings.pending_grace_s)
        finally:
            broker.close()
    err.print(f"re-sent {report.expired_leases} expired lease(s) and {report.lost_messages} lost message(s)")


@app.command("cleanup")
def cleanup_cmd(
    retention_days: Annotated[int | None, typer.Option(min=0, help="Keep finished jobs this many days.")] = None,
) -> None:
    """Delete old finished jobs, staging leftovers and unreferenced object versions."""
    from pipeline.cleanup import cleanup

    with runtime() as rt:
        report = cleanup(rt.engine, rt.store, retention_days=retention_days if retention_days is not None
                         else rt.settings.retention_days, grace_s=rt.settings.gc_grace_s,
                         task_retention_days=rt.settings.task_retention_days)
    err.print(f"deleted {report.jobs_deleted} job(s), {report.tasks_deleted} completed task row(s), "
              f"{report.staging_deleted} staging part(s), {report.versions_deleted} unreferenced version(s)")


def parse_job_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise fail(f"not a job id: {value!r}") from None


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="Only jobs with this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
) -> None:
    """List recent jobs."""
    from sqlalchemy import select

    from pipeline.models import SyncJob

    with runtime() as rt, rt.engine.connect() as conn:
        query = select(SyncJob.__table__).order_by(SyncJob.created_at.desc()).limit(limit)
        if status:
            query = query.where(SyncJob.status == status)
        rows = conn.execute(query).all()
    table = Table("id", "trigger", "mode", "status", "tasks", "done", "failed", "records", "created")
    for r in rows:
        table.add_row(str(r.id), r.trigger, r.mode, r.status, str(r.total_tasks), str(r.completed_tasks),
                      str(r.failed_tasks), str(r.processed_records), r.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str) -> None:
    """Show a job's progress and its tasks."""
    from sqlalchemy import select

    from pipeline.models import SyncTask
    from pipeline.progress import job_progress

    jid = parse_job_id(job_id)
    with runtime() as rt:
        p = job_progress(rt.engine, jid)
        with rt.engine.connect() as conn:
            tasks = conn.execute(select(SyncTask.__table__).where(SyncTask.job_id == jid)
                                 .order_by(SyncTask.id)).all()
    eta = p.eta_seconds()
    err.print(f"job {p.job_id}: {p.status}, {p.percent}% ({p.done_tasks}/{p.total_tasks}), "
              f"{p.processed_records} records, eta {'--' if eta is None else f'{eta:.0f}s'}"
              + (f", error: {p.error}" if p.error else ""))
    table = Table("task", "company", "resource", "partition", "status", "attempts", "chunks", "records", "error")
    for t in tasks:
        table.add_row(str(t.id), str(t.company_id), t.resource, t.partition_key, t.status, str(t.attempts),
                      str(t.chunks), str(t.record_count), (t.error_message or "")[:80])
    out.print(table)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Cancel a job: pending tasks at once, running ones at their next chunk boundary."""
    from pipeline.control import cancel_job

    jid = parse_job_id(job_id)
    with runtime() as rt:
        result = cancel_job(rt.engine, job_id=jid, requested_by="cli")
    err.print(f"job {jid} cancelled: {result.cancelled_tasks} open task(s) cancelled")


@jobs_app.command("retry")
def jobs_retry(
    job_id: str,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until the job ends.")] = False,
) -> None:
    """Send a finished job's failed and cancelled tasks back to work. Without a broker it runs
    them in-process and waits."""
    from actors.broker import make_broker
    from actors.tasks import declare_actors
    from pipeline.control import retry_job

    jid = parse_job_id(job_id)
    with runtime(broker=True) as rt:
        broker = make_broker(rt.settings)
        try:
            result = retry_job(rt.engine, declare_actors(broker, rt), job_id=jid, requested_by="cli")
            err.print(f"job {jid}: {result.retried_tasks} task(s) sent back to work ({result.priority} priority)")
            final = None
            if wait or not rt.settings.broker_url:
                final = watch_job(rt, broker, jid, total_hint=result.retried_tasks)
        finally:
            broker.close()
    if final is not None and final.status != "completed":
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes (one per core is a good start).")] = 1,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log one line per request.")] = False,
) -> None:
    """Serve the read and control API with uvicorn."""
    from pipeline.api.serve import serve as run_server

    s = settings()
    preflight(s)
    check_secrets_key(s)
    with errors_to_exit():
        run_server(s, host=host, port=port, workers=workers, access_log=access_log)


@app.command()
def token(
    company: Annotated[int, typer.Option("--company", help="Company id the token is for.")],
    role: Annotated[str, typer.Option(help="admin, manager or technician.")],
    employee_id: Annotated[str | None, typer.Option(help="Required for technicians.")] = None,
    ttl: Annotated[int, typer.Option(min=1, help="Lifetime in seconds.")] = 3600,
    subject: Annotated[str | None, typer.Option(help="The token's sub claim.")] = None,
) -> None:
    """Print a signed JWT for the read API (HS256 with PIPELINE_JWT_SECRET)."""
    from pipeline.auth import issue_token

    s = settings()
    with errors_to_exit():
        out.print(issue_token(s, company_id=company, role=role, employee_id=employee_id, ttl_s=ttl,
                              subject=subject), soft_wrap=True)


@app.command()
def demo(
    directory: Annotated[Path, typer.Option(help="Where the demo's SQLite file and blobs go.")] = Path(".demo"),
    serve: Annotated[bool, typer.Option("--serve", help="Then serve the API and the web console on the demo.")] = False,
    host: Annotated[str, typer.Option(help="With --serve: interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="With --serve: TCP port.")] = 8000,
) -> None:
    """Run the whole flow on the embedded default: SQLite, in-process broker, local blobs."""
    from pipeline.demo import run_demo, serve_demo

    with errors_to_exit():
        code = run_demo(directory, out=out, err=err)
        if serve and code == 0:
            serve_demo(directory, host=host, port=port, out=out)
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
