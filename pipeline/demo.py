"""``pipeline demo``: the whole flow on a fresh machine with no services."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from pipeline.companies import add_company
from pipeline.models import Company, Dataset
from pipeline.runtime import Runtime
from pipeline.settings import Settings, load_settings

DEMO_COMPANIES = [
    ("Acme Cleaning", "acme", {"jobs_per_day": 40, "employees": 12, "teams": 3, "seed": 1}, {}),
    (
        "Bright Carpets", "bright", {"jobs_per_day": 60, "employees": 20, "teams": 4, "seed": 2},
        {"TechDashboard_DisplayBillRate": False, "TechDashboard_DisplayCustomerPhoneNumbers": False},
    ),
    (
        "Coastal Restoration", "coastal", {"jobs_per_day": 25, "employees": 8, "teams": 2, "seed": 3},
        {"TechDashboard_DisplayFeeSplitRate": False, "TechDashboard_HideDiscounts": True,
         "TechDashboard_DisplayCustomerEmails": False},
    ),
]


def demo_settings(directory: Path) -> Settings:
    """The embedded default in ``directory``: SQLite, local blobs, the in-process broker."""
    return load_settings(
        database_url=f"sqlite:///{directory / 'pipeline.db'}",
        blob_url=f"file://{directory / 'blobs'}",
        broker_url=None,
    )


def run_demo(directory: Path, *, out: Console, err: Console) -> int:
    """Migrate SQLite, create three demo companies, sync them in-process, show what was written."""
    from pipeline.cli import run_sync
    from pipeline.migrate import upgrade

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    settings = demo_settings(directory)
    err.print(f"[bold]demo[/] · database {settings.database_url} · blobs {directory / 'blobs'}")
    upgrade(settings.database_url)
    rt = Runtime.from_settings(settings)
    try:
        with rt.engine.connect() as conn:
            existing = set(conn.execute(select(Company.external_id)).scalars())
        for name, external_id, config, toggles in DEMO_COMPANIES:
            if external_id not in existing:
                company = add_company(rt.engine, name=name, connector="synthetic", config=config,
                                      toggles=toggles, external_id=external_id)
                err.print(f"created company {company.id} {name!r} with toggles {toggles or '{}'}")
        final = run_sync(rt, companies=None, resources=None, partitions=None, mode="full", wait=True)
        with rt.engine.connect() as conn:
            rows = conn.execute(
                select(Company.name, Dataset.resource, Dataset.partition_key, Dataset.record_count,
                       Dataset.size_bytes, Dataset.checksum_sha256, Dataset.storage_key)
                .join(Company, Company.id == Dataset.company_id)
                .order_by(Company.id, Dataset.resource, Dataset.partition_key)
            ).all()
        table = Table("company", "resource", "partition", "records", "bytes", "sha256", title="datasets written")
        for row in rows:
            table.add_row(row.name, row.resource, row.partition_key, str(row.record_count), str(row.size_bytes),
                          row.checksum_sha256[:12])
        out.print(table)
        out.print(f"blobs lie under {directory / 'blobs'} as <company>/<resource>/<partition>/<sha256>.json, "
                  f"e.g. {directory / 'blobs' / rows[0].storage_key}" if rows else "no datasets written")
        out.print("run `pipeline demo` again: unchanged data is not rewritten, only synced_at moves.")
        return 0 if final is not None and final.status == "completed" else 1
    finally:
        rt.close()


def serve_demo(directory: Path, *, host: str, port: int, out: Console) -> None:
    """Serve the API and the web console on the demo's data until interrupted.

    Without ``PIPELINE_ADMIN_API_KEY`` / ``PIPELINE_JWT_SECRET`` a random key and secret are made
    for this run and printed (the key, and a manager's token for the first company), so the
    console opens on a fresh machine. Syncs started from it run in the API process.
    """
    from pipeline.api.serve import serve
    from pipeline.auth import issue_token

    settings = demo_settings(directory.resolve())
    admin_key = settings.admin_api_key or secrets.token_urlsafe(18)
    settings = settings.model_copy(update={
        "admin_api_key": admin_key, "jwt_secret": settings.jwt_secret or secrets.token_urlsafe(32),
    })
    # The in-process broker: a broker URL from the shell must not reach the server's workers.
    os.environ.pop("PIPELINE_BROKER_URL", None)
    url = f"http://{host}:{port}/console"
    out.print(f"console: {url}", soft_wrap=True)
    out.print(f"admin key: {admin_key}", soft_wrap=True)
    out.print(f"a manager's token for company 1: {issue_token(settings, company_id=1, role='manager', ttl_s=86400)}",
              soft_wrap=True)
    out.print("stop with Ctrl-C", soft_wrap=True)
    out.file.flush()
    serve(settings, host=host, port=port, workers=1)
