"""Defect 16: the field filter fails closed when a document lacks its rows key."""

from __future__ import annotations

from connectors.transforms import SCHEDULE_POLICY
from pipeline.policies import apply_policy


def test_a_technician_gets_no_rows_from_a_document_without_its_rows_key() -> None:
    document = {"company_id": 1, "resource": "schedule", "partition": "2026-01-01",
                "unexpected": [{"id": 1, "customerName": "Ada", "internalMemo": "gate code 1234"}]}
    seen = apply_policy(document, SCHEDULE_POLICY, role="technician", employee_id=1000, toggles={})
    assert seen[SCHEDULE_POLICY.rows] == []  # type: ignore[index]
    assert "gate code 1234" not in str(seen.get(SCHEDULE_POLICY.rows))
