"""An upstream fuzz: Hypothesis-generated pages served over HTTP by a fake upstream to the REST
connector, through the real pipeline on PostgreSQL and the blob store.

Pages carry NUL characters and lone surrogates in strings, integers beyond 64 bits, nested
lists and objects as primary keys, records of the wrong type, missing and duplicated keys; or
the body is truncated JSON, non-UTF-8 bytes, or a huge page. Whatever arrives, every task ends
``completed`` or ``failed`` with a readable message within a bounded number of deliveries, the
worker raises nothing but a retry request, and a dataset published earlier is untouched.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from pipeline.companies import add_company
from pipeline.execution import Outcome, RetryTask, run_task
from pipeline.models import DATASETS, TASKS
from pipeline.planning import plan_job
from pipeline.runtime import Runtime
from tests.fakes.upstreams import FakeUpstream, Reply

FUZZ: dict[str, int] = {"examples": 0, "completed": 0, "failed": 0}
DELIVERIES = 10
BOUND_S = 60.0

nasty_text = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["a\x00b", "\x00", "\udcff", "x\ud800y", "é", "\u2028", ""]),
)
json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    nasty_text,
)
key_value = st.one_of(
    st.integers(0, 50), st.integers(2**63, 2**70), nasty_text, st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=1), st.none(), st.booleans(),
)
record = st.one_of(
    st.fixed_dictionaries({"id": key_value}, optional={"name": nasty_text, "n": json_scalar,
                                                         "tags": st.lists(nasty_text, max_size=2)}),
    st.fixed_dictionaries({"name": nasty_text}),  # no primary key
    json_scalar,  # not an object
    st.lists(st.integers(), max_size=2),
)
good_record = st.fixed_dictionaries({"id": st.integers(0, 200), "name": st.text(max_size=5)})


@st.composite
def page_body(draw: st.DrawFn, last: bool) -> bytes:
    kind = draw(st.sampled_from(["nasty", "good", "good", "truncated", "not_utf8", "huge", "not_object"]))
    records: list[Any]
    if kind == "huge":
        records = [{"id": i, "name": "x" * 20} for i in range(draw(st.integers(2_000, 20_000)))]
    elif kind == "good":
        records = draw(st.lists(good_record, max_size=20))
    else:
        records = draw(st.lists(record, max_size=8))
    body = json.dumps({"data": records, "more": not last}).encode()  # ensure_ascii: \u escapes
    if kind == "truncated":
        return body[: draw(st.integers(0, max(0, len(body) - 1)))]
    if kind == "not_utf8":
        return b'{"data": [{"id": 1, "name": "\xff\xfe"}], "more": false}'
    if kind == "not_object":
        return json.dumps(records).encode()
    return body


class FuzzApi(FakeUpstream):
    """Serves ``pages`` in order for ``GET /items?page=N`` (1-based)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.pages: list[bytes] = []

    def route(self, path: str, params: dict[str, str]) -> Reply:
        index = int(params.get("page", "1")) - 1
        raw = self.pages[index] if 0 <= index < len(self.pages) else b'{"data": [], "more": false}'
        return Reply(200, None, raw=raw)

    def _error_body(self, status: int, message: str) -> Any:
        return {"error": message}

    def _malformed_body(self, variant: Any) -> Any:
        return None


@pytest.fixture
def fuzz_api() -> Iterator[FuzzApi]:
    api = FuzzApi().start()
    try:
        yield api
    finally:
        api.stop()


def rest_config(api: FuzzApi) -> dict[str, Any]:
    return {
        "base_url": api.base_url,
        "retry": {"max_attempts": 1, "backoff_s": 0.01, "max_backoff_s": 0.01},
        "resources": {"items": {
            "path": "/items", "records": "data", "primary_key": "id",
            "paginator": {"type": "page", "page_param": "page", "size_param": "size", "size": 10, "has_more": "more"},
        }},
    }


def dataset_rows(rt: Runtime) -> dict[int, tuple[str, str]]:
    with rt.engine.connect() as conn:
        return {row.company_id: (row.storage_key, row.checksum_sha256) for row in conn.execute(select(DATASETS))}


@pytest.mark.settings(task_time_budget_s=30)
def test_any_upstream_page_ends_its_task_with_a_readable_message_and_touches_no_other_dataset(
    stack: Runtime, fuzz_api: FuzzApi,
) -> None:
    fuzz_api.pages = [json.dumps({"data": [{"id": 1, "name": "kept"}], "more": False}).encode()]
    keeper = add_company(stack.engine, name="keeper", connector="rest", config=rest_config(fuzz_api)).id
    planned = plan_job(stack.engine, None, trigger="api", company_ids=[keeper])
    assert planned is not None and run_task(stack, planned.task_ids[0]) is Outcome.COMPLETED
    kept = dataset_rows(stack)[keeper]

    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
    @given(bodies=st.integers(1, 3).flatmap(
        lambda n: st.tuples(*(page_body(last=i == n - 1) for i in range(n)))))
    def one_upstream(bodies: tuple[bytes, ...]) -> None:
        FUZZ["examples"] += 1
        fuzz_api.pages = list(bodies)
        company = add_company(stack.engine, name=f"fuzz{FUZZ['examples']}", connector="rest",
                              config=rest_config(fuzz_api)).id
        job = plan_job(stack.engine, None, trigger="api", company_ids=[company])
        assert job is not None
        (task_id,) = job.task_ids
        started = time.monotonic()
        outcome = None
        for _ in range(DELIVERIES):
            try:
                outcome = run_task(stack, task_id)
            except RetryTask:
                continue
            if outcome not in (Outcome.CONTINUE, Outcome.SKIPPED):
                break
        assert time.monotonic() - started < BOUND_S
        with stack.engine.connect() as conn:
            task = conn.execute(select(TASKS).where(TASKS.c.id == task_id)).one()
        assert task.status in ("completed", "failed"), (task.status, task.error_message, bodies[:1])
        FUZZ[task.status] += 1
        if task.status == "failed":
            message = task.error_message or ""
            assert message.strip() and "\x00" not in message and "Traceback" not in message
        else:
            key, checksum = dataset_rows(stack)[company]
            assert hashlib.sha256(stack.store.get(key)).hexdigest() == checksum
        assert dataset_rows(stack)[keeper] == kept

    one_upstream()
    assert hashlib.sha256(stack.store.get(kept[0])).hexdigest() == kept[1]
    print(f"upstream fuzz: {FUZZ}")
