"""Defects 10 and 15 in assembly: bounded open files, and bad records named."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import pytest

from errors import BadRecord, FailureKind, classify
from pipeline.assembly import MERGE_FAN_IN, SortedRuns, check_records


@pytest.fixture
def few_file_descriptors() -> Iterator[int]:
    """Lower this process's open-file limit to what it has open now plus 200."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    limit = in_use + 200
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_merging_a_thousand_chunks_keeps_open_files_bounded(few_file_descriptors: int, tmp_path: object) -> None:
    runs = SortedRuns("id", directory=str(tmp_path))
    for chunk in range(1000):
        runs.add([{"id": chunk * 2, "chunk": chunk}, {"id": 1, "chunk": chunk}])  # id 1 in every chunk
    try:
        merged = list(runs.merged())
    finally:
        runs.close()
    assert MERGE_FAN_IN < 200
    assert [r["id"] for r in merged] == sorted({1, *(c * 2 for c in range(1000))})
    assert next(r for r in merged if r["id"] == 1)["chunk"] == 999, "the latest chunk wins"


@pytest.mark.parametrize(("record", "problem"), [
    ({"id": [1]}, "is a JSON array"),
    ({"id": {"a": 1}}, "is a JSON object"),
    ({"id": True}, "is a JSON boolean"),
    ({"other": 1}, "has no primary key"),
    (["x"], "is a JSON array, expected an object"),
])
def test_a_record_with_an_unusable_primary_key_is_a_permanent_error_naming_it(record: object, problem: str) -> None:
    with pytest.raises(BadRecord, match=problem) as caught:
        check_records([{"id": 1}, record], "id", first=10)
    assert "record #11" in str(caught.value) and classify(caught.value) is FailureKind.PERMANENT
