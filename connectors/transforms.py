"""Transforms: upstream records → one JSON document per partition.

A document never contains a timestamp of the sync itself, so unchanged upstream data keeps its
checksum. Rows are sorted by their primary key, so the same records give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from connectors.base import Record
from connectors.policy import FieldPolicy, ToggleRule
from pipeline.errors import ConnectorError, UpstreamError

Document = dict[str, Any]
Transform = Callable[[int, str, str, list[Record]], Document]

SCHEDULE_POLICY = FieldPolicy(
    rows="jobs",
    owner_list="employeeSchedules",
    owner_key="EmployeeInformationId",
    toggle_rules=(
        ToggleRule("TechDashboard_DisplayBillRate", "billRate"),
        ToggleRule("TechDashboard_DisplayFeeSplitRate", "feeSplitRate"),
        ToggleRule("TechDashboard_DisplayAddOnRate", "addOnRate"),
        ToggleRule("TechDashboard_DisplayRoomRate", "roomRate"),
        ToggleRule("TechDashboard_DisplayCustomerPhoneNumbers", "contactInfo.phone"),
        ToggleRule("TechDashboard_DisplayCustomerEmails", "contactInfo.email"),
        ToggleRule("TechDashboard_HideDiscounts", "discounts", hide_when=True),
    ),
    technician_hidden=("internalMemo", "accessInformation"),
    drop_when_empty=("contactInfo",),
)

USERS_POLICY = FieldPolicy()
IDENTITY_POLICY = FieldPolicy()


def _sort_key(value: Any) -> tuple[int, Any]:
    # Numbers before strings, each in natural order: ids may be either upstream.
    if isinstance(value, bool) or value is None:
        return (2, str(value))
    if isinstance(value, int | float):
        return (0, value)
    return (1, str(value))


def dedupe(records: Iterable[Record], primary_key: str) -> list[Record]:
    """Keep the last record of each primary key (later chunks win), sorted by that key.

    Raises:
        UpstreamError: a record lacks the primary key.
    """
    by_key: dict[Any, Record] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UpstreamError(f"record #{index} is {type(record).__name__}, expected an object")
        if primary_key not in record or record[primary_key] is None:
            raise UpstreamError(f"record #{index} has no primary key {primary_key!r}")
        by_key[record[primary_key]] = record
    return [by_key[key] for key in sorted(by_key, key=_sort_key)]


def _require(record: Record, key: str, index: int) -> Any:
    if key not in record:
        raise UpstreamError(f"job record #{index} lacks field {key!r}")
    return record[key]


def schedule(company_id: int, resource: str, partition: str, records: list[Record]) -> Document:
    jobs: list[dict[str, Any]] = []
    employees: dict[Any, str] = {}
    teams: dict[Any, str] = {}
    for index, record in enumerate(records):
        schedules = record.get("EmployeeSchedules") or []
        if not isinstance(schedules, list):
            raise UpstreamError(f"job record #{index}: EmployeeSchedules is not a list")
        job_employees = []
        for assignment in schedules:
            if not isinstance(assignment, dict) or "EmployeeInformationId" not in assignment:
                raise UpstreamError(f"job record #{index}: an EmployeeSchedules entry lacks EmployeeInformationId")
            employee_id = assignment["EmployeeInformationId"]
            name = assignment.get("EmployeeName")
            team_id = assignment.get("TeamId")
            employees[employee_id] = name or ""
            if team_id is not None:
                teams[team_id] = assignment.get("TeamName") or ""
            job_employees.append({"EmployeeInformationId": employee_id, "name": name, "teamId": team_id})
        job_employees.sort(key=lambda item: _sort_key(item["EmployeeInformationId"]))
        jobs.append(
            {
                "id": _require(record, "JobInformationId", index),
                "date": record.get("JobDate"),
                "customerName": record.get("CustomerName"),
                "contactInfo": {"phone": record.get("CustomerPhone"), "email": record.get("CustomerEmail")},
                "billRate": record.get("BillRate"),
                "feeSplitRate": record.get("FeeSplitRate"),
                "addOnRate": record.get("AddOnRate"),
                "roomRate": record.get("RoomRate"),
                "discounts": record.get("Discounts"),
                "internalMemo": record.get("InternalMemo"),
                "accessInformation": record.get("AccessInformation"),
                "employeeSchedules": job_employees,
            }
        )
    jobs.sort(key=lambda job: _sort_key(job["id"]))
    employee_rows = [
        {"EmployeeInformationId": key, "name": employees[key]} for key in sorted(employees, key=_sort_key)
    ]
    team_rows = [{"id": key, "name": teams[key]} for key in sorted(teams, key=_sort_key)]
    return {
        "company_id": company_id,
        "resource": resource,
        "partition": partition,
        "jobs": jobs,
        "employees": employee_rows,
        "teams": team_rows,
        "counts": {"jobs": len(jobs), "employees": len(employee_rows), "teams": len(team_rows)},
    }


def users(company_id: int, resource: str, partition: str, records: list[Record]) -> Document:
    return {
        "company_id": company_id,
        "resource": resource,
        "partition": partition,
        "users": records,
        "counts": {"users": len(records)},
    }


def identity(company_id: int, resource: str, partition: str, records: list[Record]) -> Document:
    return {
        "company_id": company_id,
        "resource": resource,
        "partition": partition,
        "records": records,
        "counts": {"records": len(records)},
    }


TRANSFORMS: dict[str, Transform] = {"schedule": schedule, "users": users, "identity": identity}
POLICIES: dict[str, FieldPolicy] = {
    "schedule": SCHEDULE_POLICY,
    "users": USERS_POLICY,
    "identity": IDENTITY_POLICY,
}
DOCUMENT_ROWS: dict[str, str] = {"schedule": "jobs", "users": "users", "identity": "records"}


def get_transform(name: str) -> Transform:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ConnectorError(f"unknown transform {name!r} (known: {', '.join(TRANSFORMS)})") from None
