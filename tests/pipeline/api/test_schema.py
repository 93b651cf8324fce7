"""schemathesis against ``/openapi.json``: no 5xx, every answer conforms to the schema.

Cases come from schemathesis' Hypothesis strategies driven by a plain ``@given``: the
``schema.parametrize()`` + ``from_fixture`` route does not run on pytest 9 yet (it sets a
private ``_nodeid`` that pytest 9 no longer has).
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.pipeline.api.conftest import Api
from tests.pipeline.api.helpers import employee_ids, publish_document, schedule_document

MAX_EXAMPLES = 30


def documented_partition(api: Api) -> str:
    """The example partition key the schema advertises, so generated requests can find data."""
    operation = api.client.get("/openapi.json").json()["paths"]["/v1/{resource}/{partition}"]["get"]
    (parameter,) = [p for p in operation["parameters"] if p["name"] == "partition"]
    example: str = parameter["schema"]["examples"][0]
    return example


@pytest.mark.parametrize("role", ["manager", "technician"])
def test_the_api_conforms_to_its_schema_and_never_answers_5xx(api: Api, role: str) -> None:
    tenant = api.add_tenant({"TechDashboard_DisplayCustomerEmails": False})
    partition = documented_partition(api)
    publish_document(
        api.engine,
        api.store,
        company_id=tenant.id,
        resource="schedule",
        partition=partition,
        document=schedule_document(tenant.id, partition),
    )
    employee = employee_ids(tenant.schedule)[0] if role == "technician" else None
    headers = api.headers(tenant.id, role, employee)
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    published = schema["/v1/{resource}/{partition}"]["GET"].as_strategy(
        path_parameters={"resource": "schedule", "partition": partition}
    )
    statuses: list[int] = []

    @given(case=st.one_of(schema.as_strategy(), published))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        response = case.call_and_validate(headers=headers)
        statuses.append(response.status_code)

    check()
    assert 200 in statuses and 404 in statuses
    assert not [status for status in statuses if status >= 500]
