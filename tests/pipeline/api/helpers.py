"""Test helpers for the read API: publish documents the way the worker does, mint tokens."""

from __future__ import annotations

import base64
from typing import Any

import orjson
from sqlalchemy import Engine, select

from connectors.base import FetchRequest
from connectors.synthetic import SyntheticConnector
from connectors.transforms import schedule
from pipeline.datasets import serialize, storage_key
from pipeline.db import transaction
from pipeline.models import Dataset, utcnow
from storage.base import BlobStore
from storage.checksum import sha256_hex

SECRET = "read-api-tests-secret-" + "0123456789abcdef" * 3  # 70 bytes: long enough for HS512 too
ISSUER = "sync-pipeline"
PARTITION = "2030-01-15"

TOGGLE_PATHS = {
    "TechDashboard_DisplayBillRate": "billRate",
    "TechDashboard_DisplayFeeSplitRate": "feeSplitRate",
    "TechDashboard_DisplayAddOnRate": "addOnRate",
    "TechDashboard_DisplayRoomRate": "roomRate",
    "TechDashboard_DisplayCustomerPhoneNumbers": "contactInfo.phone",
    "TechDashboard_DisplayCustomerEmails": "contactInfo.email",
    "TechDashboard_HideDiscounts": "discounts",
}
"""Each schedule toggle and the job field it hides from technicians."""

HIDING_VALUE = {name: name == "TechDashboard_HideDiscounts" for name in TOGGLE_PATHS}
"""The value of each toggle that hides its field (Display* false, Hide* true)."""

ALL_HIDDEN = dict(HIDING_VALUE)
ALL_SHOWN = {name: not value for name, value in HIDING_VALUE.items()}


def schedule_document(company_id: int, partition: str = PARTITION, *, jobs: int = 50) -> dict[str, Any]:
    """A realistic schedule document: the synthetic connector's records through the real transform."""
    connector = SyntheticConnector({"jobs_per_day": jobs, "page_size": max(jobs, 1)})
    chunk = connector.fetch(
        FetchRequest(company_id=company_id, external_id=None, resource="schedule", partition=partition)
    )
    return schedule(company_id, "schedule", partition, chunk.records)


def publish_document(
    engine: Engine, store: BlobStore, *, company_id: int, resource: str, partition: str, document: Any
) -> Dataset:
    """Publish like a worker: serialize, upload ``{company}/{resource}/{partition}/{sha}.json``, point at it."""
    payload = serialize(document)
    checksum = sha256_hex(payload)
    key = storage_key(company_id, resource, partition, checksum)
    rows: list[Any] = []
    if isinstance(document, dict):
        rows = document.get("jobs") or document.get("users") or []
    store.put(key, payload, metadata={"sha256": checksum, "record-count": str(len(rows))})
    now = utcnow()
    with transaction(engine) as session:
        dataset = session.scalar(
            select(Dataset).where(
                Dataset.company_id == company_id,
                Dataset.resource == resource,
                Dataset.partition_key == partition,
            )
        )
        if dataset is None:
            dataset = Dataset(company_id=company_id, resource=resource, partition_key=partition)
            session.add(dataset)
        dataset.storage_key = key
        dataset.checksum_sha256 = checksum
        dataset.size_bytes = len(payload)
        dataset.record_count = len(rows)
        dataset.synced_at = now
        dataset.changed_at = now
    return dataset


def employee_ids(document: dict[str, Any]) -> list[int]:
    """Every employee assigned to some job of a schedule document."""
    return sorted({entry["EmployeeInformationId"] for job in document["jobs"] for entry in job["employeeSchedules"]})


def jobs_of(document: dict[str, Any], employee_id: int) -> list[Any]:
    return [
        job["id"]
        for job in document["jobs"]
        if any(entry["EmployeeInformationId"] == employee_id for entry in job["employeeSchedules"])
    ]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A JWT assembled by hand, for tokens no honest library would produce."""
    return ".".join([b64url(orjson.dumps(header)), b64url(orjson.dumps(claims)), b64url(signature)])
