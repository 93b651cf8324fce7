"""``apply_policy`` and ``view_key``: pure functions over a schedule document."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from connectors.policy import FieldPolicy
from connectors.transforms import SCHEDULE_POLICY, USERS_POLICY
from pipeline.policies import FULL_VIEW, apply_policy, hidden_paths, view_key
from tests.pipeline.api.helpers import (
    ALL_HIDDEN,
    ALL_SHOWN,
    HIDING_VALUE,
    TOGGLE_PATHS,
    employee_ids,
    jobs_of,
    schedule_document,
)

JOB_FIELDS = {
    "id",
    "date",
    "customerName",
    "contactInfo",
    "billRate",
    "feeSplitRate",
    "addOnRate",
    "roomRate",
    "discounts",
    "internalMemo",
    "accessInformation",
    "employeeSchedules",
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return schedule_document(7)


def technician_view(document: dict[str, Any], employee_id: Any, toggles: dict[str, Any]) -> dict[str, Any]:
    return apply_policy(document, SCHEDULE_POLICY, role="technician", employee_id=employee_id, toggles=toggles)


def has_path(job: dict[str, Any], path: str) -> bool:
    head, _, rest = path.partition(".")
    if head not in job:
        return False
    return has_path(job[head], rest) if rest else True


@pytest.mark.parametrize("role", ["admin", "manager"])
@pytest.mark.parametrize("toggles", [{}, ALL_HIDDEN, ALL_SHOWN], ids=["unset", "all-hidden", "all-shown"])
def test_admins_and_managers_get_the_whole_document(
    document: dict[str, Any], role: str, toggles: dict[str, Any]
) -> None:
    result = apply_policy(document, SCHEDULE_POLICY, role=role, employee_id=None, toggles=toggles)
    assert result == document
    assert result is not document
    assert view_key(SCHEDULE_POLICY, role, None, toggles) == FULL_VIEW


def test_technicians_see_only_jobs_they_are_scheduled_on(document: dict[str, Any]) -> None:
    for employee in employee_ids(document):
        result = technician_view(document, employee, {})
        assert [job["id"] for job in result["jobs"]] == jobs_of(document, employee)
        assert result["jobs"], "every listed employee has at least one job"
        assert result["counts"]["jobs"] == len(result["jobs"])


@pytest.mark.parametrize("as_string", [True, False], ids=["string-id", "int-id"])
def test_employee_ids_match_as_strings(document: dict[str, Any], as_string: bool) -> None:
    employee = employee_ids(document)[0]
    result = technician_view(document, str(employee) if as_string else employee, {})
    assert [job["id"] for job in result["jobs"]] == jobs_of(document, employee)


def test_a_technician_without_employee_id_or_with_a_stranger_id_sees_no_job(document: dict[str, Any]) -> None:
    assert technician_view(document, None, {})["jobs"] == []
    assert technician_view(document, "999999", {})["jobs"] == []


def test_technicians_never_see_internal_memo_or_access_information(document: dict[str, Any]) -> None:
    employee = employee_ids(document)[0]
    for job in technician_view(document, employee, ALL_SHOWN)["jobs"]:
        assert "internalMemo" not in job and "accessInformation" not in job
        assert set(job) == JOB_FIELDS - {"internalMemo", "accessInformation"}


@pytest.mark.parametrize("toggle", sorted(TOGGLE_PATHS))
def test_each_toggle_hides_exactly_its_field_by_removing_the_key(document: dict[str, Any], toggle: str) -> None:
    employee = employee_ids(document)[0]
    result = technician_view(document, employee, {toggle: HIDING_VALUE[toggle]})
    for job in result["jobs"]:
        for other, path in TOGGLE_PATHS.items():
            assert has_path(job, path) == (other != toggle), (toggle, path)


@pytest.mark.parametrize("toggle", sorted(TOGGLE_PATHS))
def test_a_toggle_set_to_its_showing_value_or_unset_shows_the_field(document: dict[str, Any], toggle: str) -> None:
    employee = employee_ids(document)[0]
    for toggles in ({toggle: not HIDING_VALUE[toggle]}, {}):
        for job in technician_view(document, employee, toggles)["jobs"]:
            assert has_path(job, TOGGLE_PATHS[toggle])


def test_contact_info_is_absent_when_phone_and_email_are_both_hidden(document: dict[str, Any]) -> None:
    employee = employee_ids(document)[0]
    toggles = {"TechDashboard_DisplayCustomerPhoneNumbers": False, "TechDashboard_DisplayCustomerEmails": False}
    for job in technician_view(document, employee, toggles)["jobs"]:
        assert "contactInfo" not in job
    for job in technician_view(document, employee, {"TechDashboard_DisplayCustomerEmails": False})["jobs"]:
        assert set(job["contactInfo"]) == {"phone"}


def test_all_hidden_leaves_only_the_always_visible_fields(document: dict[str, Any]) -> None:
    employee = employee_ids(document)[0]
    for job in technician_view(document, employee, ALL_HIDDEN)["jobs"]:
        assert set(job) == {"id", "date", "customerName", "employeeSchedules"}


@pytest.mark.parametrize("value", ["maybe", 2, [], {"x": 1}])
def test_an_unreadable_toggle_value_hides_its_field(document: dict[str, Any], value: Any) -> None:
    employee = employee_ids(document)[0]
    for job in technician_view(document, employee, {"TechDashboard_DisplayBillRate": value})["jobs"]:
        assert "billRate" not in job


@pytest.mark.parametrize(
    ("value", "hidden"), [("false", True), ("FALSE", True), (0, True), ("true", False), (1, False)]
)
def test_string_and_integer_toggle_values_read_as_booleans(value: Any, hidden: bool) -> None:
    assert hidden_paths(SCHEDULE_POLICY, {"TechDashboard_DisplayRoomRate": value}) == (
        {"roomRate"} if hidden else set()
    )


def test_the_input_document_is_never_modified(document: dict[str, Any]) -> None:
    before = copy.deepcopy(document)
    employee = employee_ids(document)[0]
    technician_view(document, employee, ALL_HIDDEN)
    technician_view(document, employee, {"TechDashboard_DisplayCustomerEmails": False})
    apply_policy(document, SCHEDULE_POLICY, role="manager", employee_id=None, toggles=ALL_HIDDEN)
    assert document == before


def test_employees_are_reduced_to_the_people_on_the_technicians_jobs(document: dict[str, Any]) -> None:
    employee = employee_ids(document)[0]
    result = technician_view(document, employee, {})
    on_my_jobs = {entry["EmployeeInformationId"] for job in result["jobs"] for entry in job["employeeSchedules"]}
    assert {row["EmployeeInformationId"] for row in result["employees"]} == on_my_jobs
    assert result["counts"]["employees"] == len(result["employees"]) < len(document["employees"])
    assert result["teams"] == document["teams"]


def test_view_key_names_exactly_what_changes_the_output(document: dict[str, Any]) -> None:
    first, second = employee_ids(document)[:2]
    base = view_key(SCHEDULE_POLICY, "technician", first, {})
    assert base == view_key(SCHEDULE_POLICY, "technician", str(first), {})
    assert base == view_key(SCHEDULE_POLICY, "technician", first, ALL_SHOWN)
    assert base == view_key(SCHEDULE_POLICY, "technician", first, {"SomeOtherToggle": False})
    assert base != view_key(SCHEDULE_POLICY, "technician", second, {})
    assert base != view_key(SCHEDULE_POLICY, "technician", first, {"TechDashboard_DisplayBillRate": False})
    assert base != FULL_VIEW and len(base) <= 32
    hidden = dict(ALL_HIDDEN)
    assert view_key(SCHEDULE_POLICY, "technician", first, hidden) == view_key(
        SCHEDULE_POLICY, "technician", first, dict(reversed(hidden.items()))
    )


def test_a_resource_without_restrictions_is_the_full_view_for_everyone() -> None:
    users = {"company_id": 1, "users": [{"EmployeeInformationId": 1000}], "counts": {"users": 1}}
    assert view_key(USERS_POLICY, "technician", 1000, ALL_HIDDEN) == FULL_VIEW
    assert apply_policy(users, USERS_POLICY, role="technician", employee_id=1000, toggles=ALL_HIDDEN) == users


def test_without_a_rows_key_field_rules_apply_to_the_document_itself() -> None:
    policy = FieldPolicy(technician_hidden=("secret",))
    result = apply_policy({"a": 1, "secret": 2}, policy, role="technician", employee_id="1", toggles={})
    assert result == {"a": 1}
