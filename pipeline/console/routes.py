"""The web console at ``/console``: jobs with live bars, a job's tasks and log (cancel, retry),
companies (toggles, sync switch, Sync now), datasets as a manager and a technician see them,
and the fleet (queues, rates, failures).

Server-rendered Jinja2; htmx refreshes panels in place and ``static/console.js`` follows job
events. Every page needs a session (``pipeline.console.session``): an operator logs in with
the admin key and sees everything; a company's manager logs in with their JWT and sees only
their company, through the same company-scoped views as ``/v1/jobs`` (``pipeline.tenancy``).
Every POST checks the session's CSRF token. None of these routes is in the OpenAPI schema.
"""

from __future__ import annotations

import secrets
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jwt
import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from connectors import registry
from pipeline.api.control import Control, event_stream_response
from pipeline.api.deps import State, api_state
from pipeline.auth import Principal
from pipeline.companies import get_company, list_companies, update_company
from pipeline.console import fleet
from pipeline.console.session import (
    COOKIE,
    LOGIN_CSRF_COOKIE,
    Session,
    csrf_ok,
    operator_session,
    read_session,
    tenant_session,
)
from pipeline.control import (
    InvalidJobState,
    TooManyJobs,
    cancel_job,
    job_detail,
    job_logs,
    list_jobs,
    retry_job,
    submit_job,
)
from pipeline.error_codes import explain
from pipeline.errors import AuthError, ConfigError, NotFound, PipelineError
from pipeline.events import job_event_stream
from pipeline.models import DATASETS, JOBS, STATUSES, Company
from pipeline.policies import FULL_VIEW
from pipeline.tenancy import company_event_stream, company_job_detail, company_jobs

HERE = Path(__file__).parent
MAX_PREVIEW_BYTES = 256 * 1024

_environment = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True))
_environment.filters["explain"] = explain
templates = Jinja2Templates(env=_environment)

router = APIRouter(prefix="/console", include_in_schema=False)


def install_console(app: FastAPI) -> None:
    """Serve the console and its static files on ``app``."""
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")


# --- sessions ----------------------------------------------------------------------------------


def _session(request: Request) -> Session | None:
    return read_session(api_state(request).runtime.settings, request.cookies.get(COOKIE))


def _to_login() -> Response:
    return RedirectResponse("/console/login", status_code=303)


def _redirect(path: str, **query: str) -> Response:
    return RedirectResponse(path + (f"?{urlencode(query)}" if query else ""), status_code=303)


async def _form(request: Request) -> dict[str, list[str]]:
    body = await request.body()
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=1000)


def _first(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


async def _post_session(request: Request) -> tuple[Session | None, dict[str, list[str]]]:
    """The session of a state-changing request, or ``None`` when absent or its CSRF token is wrong."""
    form = await _form(request)
    session = _session(request)
    given = request.headers.get("x-csrf-token") or _first(form, "csrf")
    if session is None or not csrf_ok(session.csrf, given):
        return None, form
    return session, form


def _render(request: Request, name: str, session: Session | None, status_code: int = 200, **context: Any) -> Response:
    context.setdefault("notice", request.query_params.get("notice"))
    context.setdefault("problem", request.query_params.get("error"))
    context.update(session=session, csrf=session.csrf if session else "", page=name.removesuffix(".html"))
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    return response


def _set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/console", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


@router.get("")
@router.get("/")
def console_home() -> Response:
    return RedirectResponse("/console/jobs", status_code=303)


@router.get("/login")
def login_page(request: Request) -> Response:
    token = secrets.token_urlsafe(24)
    response = _render(request, "login.html", None, login_csrf=token)
    _set_cookie(response, request, LOGIN_CSRF_COOKIE, token, 3600)
    return response


@router.post("/login")
async def login(request: Request, state: State) -> Response:
    form = await _form(request)
    settings = state.runtime.settings
    expected = request.cookies.get(LOGIN_CSRF_COOKIE)

    def again(message: str) -> Response:
        token = secrets.token_urlsafe(24)
        response = _render(request, "login.html", None, status_code=401, login_csrf=token, problem=message)
        _set_cookie(response, request, LOGIN_CSRF_COOKIE, token, 3600)
        return response

    if not expected or not csrf_ok(expected, _first(form, "csrf")):
        return again("the login form expired; please try again")
    admin_key = (_first(form, "admin_key") or "").strip()
    token = (_first(form, "token") or "").strip()
    if admin_key:
        if not settings.admin_api_key:
            return again("operators cannot log in: PIPELINE_ADMIN_API_KEY is not set on the server")
        if not secrets.compare_digest(admin_key.encode(), settings.admin_api_key.encode()):
            return again("that is not the admin key")
        _, cookie = operator_session(settings)
        max_age = 8 * 3600
    elif token:
        try:
            principal = state.verifier(token)
        except AuthError as exc:
            return again(str(exc))
        if principal.role not in ("admin", "manager"):
            return again(f"a {principal.role} token cannot open the console; use a manager's token")
        expires = float(jwt.decode(token, options={"verify_signature": False})["exp"])
        _, cookie = tenant_session(settings, principal, expires)
        max_age = max(1, int(expires - time.time()))
    else:
        return again("enter the admin key or a manager's token")
    response = RedirectResponse("/console/jobs", status_code=303)
    _set_cookie(response, request, COOKIE, cookie, max_age)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/console")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session, _ = await _post_session(request)
    if session is None:
        return Response("missing or wrong CSRF token", status_code=403)
    response = _to_login()
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict")
    return response


# --- jobs --------------------------------------------------------------------------------------


def _company_names(state: Any) -> dict[int, str]:
    with state.runtime.engine.connect() as conn:
        return {row.id: row.name for row in conn.execute(select(Company.id, Company.name))}


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() and len(value) < 19 else None


@router.get("/jobs")
def jobs_page(request: Request, state: State) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    status = request.query_params.get("status") or None
    status = status if status in STATUSES else None
    engine = state.runtime.engine
    if session.operator:
        company_id = _int(request.query_params.get("company_id"))
        jobs = list_jobs(engine, status=status, company_id=company_id, limit=100)
    else:
        assert session.company_id is not None
        company_id = session.company_id
        jobs = company_jobs(engine, company_id=company_id, status=status, limit=100)
    return _render(request, "jobs.html", session, jobs=jobs, statuses=STATUSES, status=status, company_id=company_id,
                   companies=_company_names(state) if session.operator else {})


def _job_companies(engine: Any, job_id: uuid.UUID) -> list[int]:
    with engine.connect() as conn:
        scope = conn.execute(select(JOBS.c.scope).where(JOBS.c.id == job_id)).scalar_one_or_none()
    return list((scope or {}).get("company_ids") or [])


def _may_steer(engine: Any, session: Session, job_id: uuid.UUID) -> bool:
    """Operators steer every job; a manager only jobs of their company alone (not the hourly one)."""
    return session.operator or _job_companies(engine, job_id) == [session.company_id]


def _load_job(engine: Any, session: Session, job_id: uuid.UUID) -> Any:
    if session.operator:
        return job_detail(engine, job_id=job_id, task_limit=2000)
    assert session.company_id is not None
    return company_job_detail(engine, job_id=job_id, company_id=session.company_id, task_limit=2000)


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: uuid.UUID, state: State) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    engine = state.runtime.engine
    try:
        detail = _load_job(engine, session, job_id)
    except NotFound:
        return _render(request, "missing.html", session, status_code=404, what=f"job {job_id}")
    logs = job_logs(engine, job_id=job_id, limit=200)
    steer = _may_steer(engine, session, job_id)
    if not session.operator:
        mine = {task.id for task in detail.tasks}
        logs = [entry for entry in logs if entry.task_id in mine or (entry.task_id is None and steer)]
    return _render(request, "job.html", session, job=detail, logs=logs, steer=steer,
                   companies=_company_names(state))


@router.get("/jobs/{job_id}/events")
async def job_events(request: Request, job_id: uuid.UUID, state: State, control: Control) -> Response:
    session = _session(request)
    if session is None:
        return Response("log in first", status_code=401)
    engine = state.runtime.engine
    if session.operator:
        return await event_stream_response(job_event_stream(engine, control.feed(), job_id))
    assert session.company_id is not None
    return await event_stream_response(
        company_event_stream(engine, control.feed(), job_id, company_id=session.company_id)
    )


@router.post("/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: uuid.UUID, state: State) -> Response:
    session, _ = await _post_session(request)
    if session is None:
        return Response("missing or wrong CSRF token", status_code=403)
    engine = state.runtime.engine

    def run() -> Response:
        if not _may_steer(engine, session, job_id):
            return _redirect(f"/console/jobs/{job_id}", error="only an operator can cancel a job of several companies")
        try:
            result = cancel_job(engine, job_id=job_id, requested_by=f"console ({session.sub})")
        except (InvalidJobState, NotFound) as exc:
            return _redirect(f"/console/jobs/{job_id}", error=str(exc))
        return _redirect(f"/console/jobs/{job_id}", notice=f"cancelled: {result.cancelled_tasks} open task(s) stopped")

    return await run_in_threadpool(run)


@router.post("/jobs/{job_id}/retry")
async def retry(request: Request, job_id: uuid.UUID, state: State, control: Control) -> Response:
    session, _ = await _post_session(request)
    if session is None:
        return Response("missing or wrong CSRF token", status_code=403)
    engine = state.runtime.engine

    def run() -> Response:
        if not _may_steer(engine, session, job_id):
            return _redirect(f"/console/jobs/{job_id}", error="only an operator can retry a job of several companies")
        try:
            result = retry_job(engine, control.dispatcher(), job_id=job_id, requested_by=f"console ({session.sub})")
        except (InvalidJobState, NotFound) as exc:
            return _redirect(f"/console/jobs/{job_id}", error=str(exc))
        return _redirect(f"/console/jobs/{job_id}", notice=f"retrying {result.retried_tasks} task(s)")

    return await run_in_threadpool(run)


# --- companies ---------------------------------------------------------------------------------


def _toggle_defaults(company: Company) -> dict[str, bool]:
    """The toggles the company's resources declare, each with its value when unset."""
    try:
        connector = registry.build(company.connector, company.connector_config or {})
    except PipelineError:
        return {}
    try:
        return {rule.toggle: not rule.hide_when for spec in connector.resources() for rule in spec.policy.toggle_rules}
    finally:
        connector.close()


def _visible_companies(state: Any, session: Session) -> list[Company]:
    engine = state.runtime.engine
    if session.operator:
        return list_companies(engine)
    assert session.company_id is not None
    return [get_company(engine, session.company_id)]


@router.get("/companies")
def companies_page(request: Request, state: State) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    rows = []
    for company in _visible_companies(state, session):
        defaults = _toggle_defaults(company)
        toggles = company.feature_toggles or {}
        names = sorted(set(defaults) | set(toggles))
        rows.append({"company": company, "toggles": [(n, bool(toggles.get(n, defaults.get(n, True))), n in toggles)
                                                     for n in names]})
    return _render(request, "companies.html", session, rows=rows)


def _owns(session: Session, company_id: int) -> bool:
    return session.operator or session.company_id == company_id


@router.post("/companies/{company_id}/sync")
async def sync_now(request: Request, company_id: int, state: State, control: Control) -> Response:
    session, _ = await _post_session(request)
    if session is None:
        return Response("missing or wrong CSRF token", status_code=403)
    if not _owns(session, company_id):
        return _render(request, "missing.html", session, status_code=404, what=f"company {company_id}")
    settings = state.runtime.settings

    def run() -> Response:
        try:
            submitted = submit_job(state.runtime.engine, control.dispatcher(), trigger="api",
                                 max_unfinished=settings.max_unfinished_jobs, company_ids=[company_id])
        except (TooManyJobs, ConfigError, NotFound) as exc:
            return _redirect("/console/companies", error=str(exc))
        return _redirect(f"/console/jobs/{submitted.job_id}", notice="sync started")

    return await run_in_threadpool(run)


@router.post("/companies/{company_id}/toggles")
async def set_toggles(request: Request, company_id: int, state: State) -> Response:
    session, form = await _post_session(request)
    if session is None:
        return Response("missing or wrong CSRF token", status_code=403)
    if not session.operator:
        return _redirect("/console/companies", error="only an operator can change feature toggles")
    engine = state.runtime.engine

    def run() -> Response:
        try:
            company = get_company(engine, company_id)
        except NotFound:
            return _redirect("/console/companies", error=f"company {company_id} does not exist")
        toggles = dict(company.feature_toggles or {})
        for name in form.get("known", []):
            toggles[name] = name in form.get("on", [])
        update_company(engine, company_id, toggles=toggles)
        return _redirect("/console/companies", notice=f"toggles of {company.name} saved")

    return await run_in_threadpool(run)


@router.post("/companies/{company_id}/enabled")
async def set_enabled(request: Request, company_id: int, state: State) -> Response:
    session, form = await _post_session(request)
    if session is None:
        return Response("missing or wrong CSRF token", status_code=403)
    if not session.operator:
        return _redirect("/console/companies", error="only an operator can switch a company's sync on or off")
    enabled = _first(form, "enabled") == "true"

    def run() -> Response:
        try:
            company = update_company(state.runtime.engine, company_id, enabled=enabled)
        except NotFound as exc:
            return _redirect("/console/companies", error=str(exc))
        return _redirect("/console/companies", notice=f"{company.name}: sync {'on' if enabled else 'off'}")

    return await run_in_threadpool(run)


# --- datasets ----------------------------------------------------------------------------------


def bucket_link(settings: Any, storage_key: str) -> str | None:
    """The object's page in the bucket browser (``PIPELINE_S3_CONSOLE_URL``), if one is configured.

    ``{bucket}`` and ``{key}`` in the setting are replaced; otherwise ``/{bucket}/{key}`` is appended.
    """
    base = settings.s3_console_url
    if not base:
        return None
    bucket, _, prefix = settings.blob_url.removeprefix("s3://").partition("/") if settings.blob_url.startswith(
        "s3://") else ("", "", "")
    key = f"{prefix.strip('/')}/{storage_key}" if prefix.strip("/") else storage_key
    if "{bucket}" in base or "{key}" in base:
        return str(base.replace("{bucket}", quote(bucket)).replace("{key}", quote(key)))
    return f"{base.rstrip('/')}/{quote(bucket)}/{quote(key)}" if bucket else f"{base.rstrip('/')}/{quote(key)}"


@router.get("/datasets")
def datasets_page(request: Request, state: State) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    company_id = _int(request.query_params.get("company_id")) if session.operator else session.company_id
    resource = request.query_params.get("resource") or None
    query = (select(DATASETS, Company.name.label("company_name")).join(Company, Company.id == DATASETS.c.company_id)
             .order_by(DATASETS.c.company_id, DATASETS.c.resource, DATASETS.c.partition_key).limit(1000))
    if company_id is not None:
        query = query.where(DATASETS.c.company_id == company_id)
    if resource:
        query = query.where(DATASETS.c.resource == resource[:100])
    with state.runtime.engine.connect() as conn:
        rows = conn.execute(query).all()
    settings = state.runtime.settings
    return _render(request, "datasets.html", session, rows=rows, company_id=company_id, resource=resource,
                   companies=_company_names(state) if session.operator else {},
                   links={row.id: bucket_link(settings, row.storage_key) for row in rows})


async def _dataset_views(
    request: Request, company_id: int, resource: str, partition: str, employee_id: str | None
) -> dict[str, Any] | None:
    """The manager's and a technician's view of one partition, exactly as the read API serves them."""
    state = api_state(request)
    company = await state.company(company_id)
    spec = None if company is None else company.resources.get(resource)
    dataset = None if spec is None else await state.dataset(company_id, resource, partition)
    if company is None or spec is None or dataset is None:
        return None
    manager = Principal(sub="console:manager", company_id=company_id, role="manager")
    full = await run_in_threadpool(state.render, dataset, spec.policy, manager, company.toggles, FULL_VIEW)
    document = orjson.loads(full)
    employees = [str(e.get("EmployeeInformationId")) for e in document.get("employees", []) if isinstance(e, dict)]
    employee = employee_id or (employees[0] if employees else "0")
    technician = Principal(sub="console:technician", company_id=company_id, role="technician", employee_id=employee)
    view = company.view(spec, technician)
    filtered = await run_in_threadpool(state.render, dataset, spec.policy, technician, company.toggles, view)

    def pretty(raw: bytes) -> str:
        text = orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode()
        return text if len(text) <= MAX_PREVIEW_BYTES else text[:MAX_PREVIEW_BYTES] + "\n… (cut for display)"

    return {"dataset": dataset, "employees": employees, "employee": employee, "manager_json": pretty(full),
            "technician_json": pretty(filtered), "toggles": dict(company.toggles)}


@router.get("/datasets/{company_id}/{resource}/{partition}")
async def dataset_page(request: Request, company_id: int, resource: str, partition: str) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    owned = _owns(session, company_id)
    views = owned and await _dataset_views(request, company_id, resource, partition,
                                           request.query_params.get("employee_id"))
    if not views:
        return _render(request, "missing.html", session, status_code=404, what="dataset")
    settings = api_state(request).runtime.settings
    return _render(request, "dataset.html", session, company_id=company_id, resource=resource, partition=partition,
                   link=bucket_link(settings, views["dataset"].storage_key), **views)


@router.get("/datasets/{company_id}/{resource}/{partition}/preview")
async def dataset_preview(request: Request, company_id: int, resource: str, partition: str) -> Response:
    session = _session(request)
    if session is None:
        return Response("log in first", status_code=401)
    owned = _owns(session, company_id)
    views = owned and await _dataset_views(request, company_id, resource, partition,
                                           request.query_params.get("employee_id"))
    if not views:
        return Response("not found", status_code=404)
    return _render(request, "dataset_preview.html", session, **views)


# --- fleet -------------------------------------------------------------------------------------


def _fleet_context(state: Any, control: Any) -> dict[str, Any]:
    engine = state.runtime.engine
    broker_problem: str | None = None
    try:
        depths = fleet.queue_depths(control.dispatcher())
    except Exception as exc:  # the broker is down: show it, keep the rest of the page
        depths, broker_problem = None, f"cannot read the queues: {type(exc).__name__}: {exc}"
    per_minute = fleet.tasks_per_minute(engine)
    failed = fleet.failed_per_hour(engine)
    recent = per_minute[-5:]
    return {
        "depths": depths, "broker_problem": broker_problem, "oldest_pending_s": fleet.oldest_pending_age_s(engine),
        "rate": round(sum(b.count for b in recent) / (60 * len(recent)), 2) if recent else 0.0,
        "rate_chart": Markup(fleet.bar_chart(per_minute, label="tasks finished per minute, last 15 minutes")),
        "failed_chart": Markup(fleet.bar_chart(failed, label="tasks failed per hour, last 24 hours")),
        "failed_total": sum(b.count for b in failed), "failed_jobs": fleet.failed_jobs_last_day(engine),
    }


@router.get("/fleet")
def fleet_page(request: Request, state: State, control: Control) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    if not session.operator:
        return _render(request, "missing.html", session, status_code=404, what="the fleet page (operators only)")
    return _render(request, "fleet.html", session, **_fleet_context(state, control))


@router.get("/fleet/panel")
def fleet_panel(request: Request, state: State, control: Control) -> Response:
    session = _session(request)
    if session is None or not session.operator:
        return Response("log in as an operator", status_code=401)
    return _render(request, "fleet_panel.html", session, **_fleet_context(state, control))
