"""The ``synthetic`` connector: deterministic field-service schedule data, no network.

It is the embedded demo's upstream and the test suite's controllable one: the same config,
company and partition always produce the same records, so a re-sync keeps its checksum.

Config keys (all optional): ``jobs_per_day`` (int, default 50), ``employees`` (20), ``teams``
(4), ``days_ahead`` (7), ``seed`` (0), ``page_size`` (records per chunk, default 500),
``version`` (bump to change every record), and fault injection for tests and drills:
``fail_attempts`` (the first N attempts of a task fail with a retryable upstream error),
``fail_partitions`` (limit those failures to these partitions; default all),
``poison_partitions`` (partitions whose records are malformed on every attempt),
``chunk_delay_s`` (sleep per chunk, to make tasks observable mid-run).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from datetime import date, timedelta
from typing import Any

from connectors.base import Chunk, ConnectorContext, FetchRequest, RateLimiter, Record, ResourceSpec, ResponseHook
from connectors.oauth2 import TokenStore
from connectors.registry import register
from connectors.transforms import POLICIES
from errors import ConfigError, ConnectorError, UpstreamError

_FIRST = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lia")
_LAST = ("Park", "Nakamura", "Okafor", "Silva", "Novak", "Haddad", "Lindqvist", "Moreau")
_STREETS = ("Oak St", "Pine Ave", "Harbor Rd", "Mill Ln", "Cedar Ct", "Elm Blvd")

_INT_KEYS = {
    "jobs_per_day": (0, 1_000_000_000),
    "employees": (1, 100_000),
    "teams": (1, 10_000),
    "days_ahead": (1, 366),
    "seed": (-(2**31), 2**31),
    "page_size": (1, 1_000_000),
    "version": (0, 2**31),
    "fail_attempts": (0, 1000),
}

RESOURCES = (
    ResourceSpec("schedule", primary_key="JobInformationId", transform="schedule", policy=POLICIES["schedule"]),
    ResourceSpec("users", primary_key="EmployeeInformationId", transform="users", policy=POLICIES["users"]),
)


class SyntheticConnector:
    name = "synthetic"

    def __init__(
        self, config: Mapping[str, Any], *, limiter: RateLimiter | None = None,
        on_response: ResponseHook | None = None, context: ConnectorContext | None = None,
        tokens: TokenStore | None = None,
    ) -> None:
        known = {*_INT_KEYS, "fail_partitions", "poison_partitions", "chunk_delay_s"}
        for key in config:
            if key not in known:
                raise ConfigError(f"synthetic config: unknown key {key!r} (known: {', '.join(sorted(known))})")
        values: dict[str, int] = {}
        defaults = {"jobs_per_day": 50, "employees": 20, "teams": 4, "days_ahead": 7, "seed": 0,
                    "page_size": 500, "version": 0, "fail_attempts": 0}
        for key, (low, high) in _INT_KEYS.items():
            value = config.get(key, defaults[key])
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"synthetic config: {key!r} must be an integer in [{low}, {high}], got {value!r}")
            values[key] = value
        self.jobs_per_day = values["jobs_per_day"]
        self.employees = values["employees"]
        self.teams = min(values["teams"], self.employees)
        self.days_ahead = values["days_ahead"]
        self.seed = values["seed"]
        self.page_size = values["page_size"]
        self.version = values["version"]
        self.fail_attempts = values["fail_attempts"]
        self.fail_partitions = self._string_list(config, "fail_partitions")
        self.poison_partitions = self._string_list(config, "poison_partitions") or set()
        delay = config.get("chunk_delay_s", 0)
        if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 60:
            raise ConfigError(f"synthetic config: 'chunk_delay_s' must be a number in [0, 60], got {delay!r}")
        self.chunk_delay_s = float(delay)

    @staticmethod
    def _string_list(config: Mapping[str, Any], key: str) -> set[str] | None:
        value = config.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"synthetic config: {key!r} must be a list of strings")
        return set(value)

    def resources(self) -> Sequence[ResourceSpec]:
        return RESOURCES

    def partitions(self, resource: str, today: date) -> list[str]:
        if resource == "schedule":
            return [(today + timedelta(days=offset)).isoformat() for offset in range(self.days_ahead)]
        if resource == "users":
            return ["all"]
        raise ConnectorError(f"connector 'synthetic' has no resource {resource!r} (offers: schedule, users)")

    def fetch(self, request: FetchRequest) -> Chunk:
        if self.fail_attempts and request.attempt <= self.fail_attempts and (
            self.fail_partitions is None or request.partition in self.fail_partitions
        ):
            raise UpstreamError(
                f"synthetic upstream unavailable (injected failure, attempt {request.attempt})", retryable=True
            )
        if self.chunk_delay_s:
            time.sleep(self.chunk_delay_s)
        total = self.jobs_per_day if request.resource == "schedule" else self.employees
        offset = int((request.state or {}).get("offset", 0))
        end = min(offset + self.page_size, total)
        if request.resource == "schedule":
            records = [self._job(request, index) for index in range(offset, end)]
        elif request.resource == "users":
            records = [self._user(index) for index in range(offset, end)]
        else:
            raise ConnectorError(f"connector 'synthetic' has no resource {request.resource!r}")
        if request.partition in self.poison_partitions:
            records = [{"malformed": True}]
        return Chunk(records=records, state={"offset": end}, done=end >= total)

    def close(self) -> None:
        pass

    def _employee_name(self, index: int) -> str:
        return f"{_FIRST[index % len(_FIRST)]} {_LAST[(index // len(_FIRST)) % len(_LAST)]} {index}"

    def _user(self, index: int) -> Record:
        return {
            "EmployeeInformationId": 1000 + index,
            "Name": self._employee_name(index),
            "TeamId": 1 + index % self.teams,
            "Active": True,
        }

    def _job(self, request: FetchRequest, index: int) -> Record:
        rng = random.Random(f"{self.seed}:{self.version}:{request.company_id}:{request.partition}:{index}")
        day = request.partition.replace("-", "")
        assigned = sorted(rng.sample(range(self.employees), k=min(self.employees, rng.randint(1, 3))))
        customer = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        return {
            "JobInformationId": int(day) * 100_000 + index if day.isdigit() else index,
            "JobDate": request.partition,
            "CustomerName": customer,
            "CustomerPhone": f"+1-555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
            "CustomerEmail": f"{customer.split()[0].lower()}{index}@example.com",
            "BillRate": round(rng.uniform(80, 250), 2),
            "FeeSplitRate": round(rng.uniform(0.2, 0.6), 2),
            "AddOnRate": round(rng.uniform(0, 40), 2),
            "RoomRate": round(rng.uniform(10, 60), 2),
            "Discounts": [{"code": "LOYAL", "amount": 10.0}] if rng.random() < 0.2 else [],
            "InternalMemo": f"memo {index}: gate code {rng.randint(1000, 9999)}",
            "AccessInformation": f"{rng.randint(1, 999)} {rng.choice(_STREETS)}, key under mat",
            "EmployeeSchedules": [
                {
                    "EmployeeInformationId": 1000 + employee,
                    "EmployeeName": self._employee_name(employee),
                    "TeamId": 1 + employee % self.teams,
                    "TeamName": f"Team {1 + employee % self.teams}",
                }
                for employee in assigned
            ],
        }


register("synthetic", SyntheticConnector)
