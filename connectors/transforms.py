"""Transforms: upstream records → one JSON document per partition.

A document never contains a timestamp of the sync itself, so unchanged upstream data keeps its
checksum. Rows are sorted by their primary key, so the same records give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from connectors.base import Record
from connectors.policy import FieldPolicy, ToggleRule
from errors import ConnectorError, UpstreamError

Document = dict[str, Any]

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


def sort_key(value: Any) -> tuple[int, Any]:
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
    return [by_key[key] for key in sorted(by_key, key=sort_key)]


def _require(record: Record, key: str, index: int) -> Any:
    if key not in record:
        raise UpstreamError(f"record #{index} lacks field {key!r}")
    return record[key]


class Aggregator(Protocol):
    """Collects document-level lists (e.g. the employees of a schedule) while rows stream by."""

    def add(self, record: Record, index: int) -> None: ...

    def result(self) -> dict[str, list[Any]]: ...


@dataclass(frozen=True, slots=True)
class TransformSpec:
    """How records become a document: one row per record, plus optional aggregate lists.

    The document is ``{"company_id", "resource", "partition", <rows_key>: [rows], "counts",
    **aggregates}``; rows appear in the order of the records given (deduplicated and sorted
    by primary key by the caller), so the same records always give the same bytes.
    """

    name: str
    rows_key: str
    row: Callable[[Record, int], Any]
    aggregator: Callable[[], Aggregator] | None = None


def _schedule_row(record: Record, index: int) -> dict[str, Any]:
    schedules = record.get("EmployeeSchedules") or []
    if not isinstance(schedules, list):
        raise UpstreamError(f"job record #{index}: EmployeeSchedules is not a list")
    assigned = []
    for assignment in schedules:
        if not isinstance(assignment, dict) or "EmployeeInformationId" not in assignment:
            raise UpstreamError(f"job record #{index}: an EmployeeSchedules entry lacks EmployeeInformationId")
        assigned.append({"EmployeeInformationId": assignment["EmployeeInformationId"],
                         "name": assignment.get("EmployeeName"), "teamId": assignment.get("TeamId")})
    assigned.sort(key=lambda item: sort_key(item["EmployeeInformationId"]))
    return {
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
        "employeeSchedules": assigned,
    }


class _ScheduleAggregator:
    """Employees and teams of a schedule: small (bounded by staff size), whatever the job count."""

    def __init__(self) -> None:
        self.employees: dict[Any, str] = {}
        self.teams: dict[Any, str] = {}

    def add(self, record: Record, index: int) -> None:
        for assignment in record.get("EmployeeSchedules") or []:
            self.employees[assignment["EmployeeInformationId"]] = assignment.get("EmployeeName") or ""
            if assignment.get("TeamId") is not None:
                self.teams[assignment["TeamId"]] = assignment.get("TeamName") or ""

    def result(self) -> dict[str, list[Any]]:
        return {
            "employees": [{"EmployeeInformationId": key, "name": self.employees[key]}
                          for key in sorted(self.employees, key=sort_key)],
            "teams": [{"id": key, "name": self.teams[key]} for key in sorted(self.teams, key=sort_key)],
        }


def _as_object(record: Record, index: int) -> Record:
    return record


SCHEDULE = TransformSpec("schedule", "jobs", _schedule_row, _ScheduleAggregator)
USERS = TransformSpec("users", "users", _as_object)
IDENTITY = TransformSpec("identity", "records", _as_object)


def render(
    spec: TransformSpec, company_id: int, resource: str, partition: str,
    records: Callable[[], Iterable[Record]],
) -> Iterator[bytes]:
    """Stream the document as compact JSON with sorted keys, byte-identical to
    ``orjson.dumps(build(...), option=OPT_SORT_KEYS)``, in bounded memory.

    ``records`` is called twice (counts and aggregates sort before the rows), so it must yield
    the same records each time.
    """
    # First pass: counts and aggregates, which sort before the rows.
    count = 0
    aggregator = spec.aggregator() if spec.aggregator is not None else None
    for index, record in enumerate(records()):
        if aggregator is not None:
            aggregator.add(record, index)
        count += 1
    aggregates = aggregator.result() if aggregator is not None else {}
    meta: dict[str, Any] = {"company_id": company_id, "resource": resource, "partition": partition, **aggregates}
    keys = sorted([*meta, spec.rows_key, "counts"])
    rows_written = 0
    yield b"{"
    for position, key in enumerate(keys):
        yield (b"," if position else b"") + orjson.dumps(key) + b":"
        if key == spec.rows_key:
            yield b"["
            for index, record in enumerate(records()):
                yield (b"," if index else b"") + orjson.dumps(spec.row(record, index), option=orjson.OPT_SORT_KEYS)
                rows_written = index + 1
            yield b"]"
            if rows_written != count:
                raise ConnectorError("records changed between the two passes of a transform")
        elif key == "counts":
            counts = {spec.rows_key: count, **{name: len(items) for name, items in aggregates.items()}}
            yield orjson.dumps(counts, option=orjson.OPT_SORT_KEYS)
        else:
            yield orjson.dumps(meta[key], option=orjson.OPT_SORT_KEYS)
    yield b"}"


def build(spec: TransformSpec, company_id: int, resource: str, partition: str, records: list[Record]) -> Document:
    """The document as a dict (for small documents and tests); same content as ``render``."""
    rows = [spec.row(record, index) for index, record in enumerate(records)]
    aggregates: dict[str, list[Any]] = {}
    if spec.aggregator is not None:
        aggregator = spec.aggregator()
        for index, record in enumerate(records):
            aggregator.add(record, index)
        aggregates = aggregator.result()
    counts = {spec.rows_key: len(rows), **{name: len(items) for name, items in aggregates.items()}}
    return {"company_id": company_id, "resource": resource, "partition": partition, spec.rows_key: rows,
            "counts": counts, **aggregates}


def schedule(company_id: int, resource: str, partition: str, records: list[Record]) -> Document:
    """The schedule document of ``records`` (deduplicated and sorted by JobInformationId)."""
    return build(SCHEDULE, company_id, resource, partition, dedupe(records, "JobInformationId"))


TRANSFORMS: dict[str, TransformSpec] = {spec.name: spec for spec in (SCHEDULE, USERS, IDENTITY)}
POLICIES: dict[str, FieldPolicy] = {
    "schedule": SCHEDULE_POLICY,
    "users": USERS_POLICY,
    "identity": IDENTITY_POLICY,
}
DOCUMENT_ROWS: dict[str, str] = {name: spec.rows_key for name, spec in TRANSFORMS.items()}


def get_transform(name: str) -> TransformSpec:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ConnectorError(f"unknown transform {name!r} (known: {', '.join(TRANSFORMS)})") from None
