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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.base import Chunk, ConnectorContext, FetchRequest, RateLimiter, Record, ResourceSpec, ResponseHook
from connectors.jsontypes import JsonInt
from connectors.oauth2 import TokenStore
from connectors.registry import register
from connectors.transforms import POLICIES
from errors import ConfigError, ConnectorError, UpstreamError

_FIRST = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lia")
_LAST = ("Park", "Nakamura", "Okafor", "Silva", "Novak", "Haddad", "Lindqvist", "Moreau")
_STREETS = ("Oak St", "Pine Ave", "Harbor Rd", "Mill Ln", "Cedar Ct", "Elm Blvd")

class SyntheticConfig(BaseModel):
    """The ``synthetic`` connector's config: every key optional (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    jobs_per_day: JsonInt = Field(default=50, ge=0, le=1_000_000_000)
    employees: JsonInt = Field(default=20, ge=1, le=100_000)
    teams: JsonInt = Field(default=4, ge=1, le=10_000)
    days_ahead: JsonInt = Field(default=7, ge=1, le=366)
    seed: JsonInt = Field(default=0, ge=-(2**31), le=2**31)
    page_size: JsonInt = Field(default=500, ge=1, le=1_000_000)
    version: JsonInt = Field(default=0, ge=0, le=2**31)
    fail_attempts: JsonInt = Field(default=0, ge=0, le=1000)
    fail_partitions: list[str] | None = None
    poison_partitions: list[str] | None = None
    chunk_delay_s: float = Field(default=0.0, ge=0, le=60)


def parse_config(config: Any) -> SyntheticConfig:
    """Validate a company's ``synthetic`` config.

    Raises:
        ConfigError: naming each bad key, e.g. ``synthetic config: days_ahead: ...``.
    """
    try:
        return SyntheticConfig.model_validate(config)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            key = ".".join(str(part) for part in error["loc"]) or "config"
            message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            problems.append(f"{key}: {message}")
        raise ConfigError("synthetic config: " + "; ".join(problems)) from None


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
        parsed = parse_config(config)
        self.jobs_per_day = parsed.jobs_per_day
        self.employees = parsed.employees
        self.teams = min(parsed.teams, self.employees)
        self.days_ahead = parsed.days_ahead
        self.seed = parsed.seed
        self.page_size = parsed.page_size
        self.version = parsed.version
        self.fail_attempts = parsed.fail_attempts
        self.fail_partitions = None if parsed.fail_partitions is None else set(parsed.fail_partitions)
        self.poison_partitions = set(parsed.poison_partitions or ())
        self.chunk_delay_s = float(parsed.chunk_delay_s)

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


register("synthetic", SyntheticConnector, config_model=SyntheticConfig)
