"""The error-code mapping (``pipeline.error_codes``): each failure a task can meet gets its code."""

from __future__ import annotations

import httpx
import pytest

from pipeline.error_codes import CODES, error_code, explain
from pipeline.errors import (
    BadRecord,
    ChecksumMismatch,
    ConfigError,
    ConnectorError,
    DatabaseUnavailable,
    DeadlineExceeded,
    InvalidKey,
    ObjectMissing,
    StorageError,
    TaskCancelled,
    UpstreamError,
    VersionChanged,
)


def chained(outer: Exception, cause: BaseException) -> Exception:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer from inner
    except Exception as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (UpstreamError("HTTP 401: bad token", status=401), "upstream_auth"),
        (UpstreamError("HTTP 403: forbidden", status=403), "upstream_auth"),
        (UpstreamError("HTTP 429 (gave up after 5 attempts)", retryable=True, status=429), "rate_limited"),
        (UpstreamError("HTTP 404: no such page", status=404), "upstream_rejected"),
        (UpstreamError("HTTP 503 (gave up)", retryable=True, status=503), "upstream_unavailable"),
        (UpstreamError("envelope key 'IsSuccess' is missing from the response"), "upstream_malformed"),
        (BadRecord("record #3 has no primary key 'id'"), "upstream_malformed"),
        (chained(UpstreamError("GET /x: ReadTimeout", retryable=True), httpx.ReadTimeout("timed out")), "timeout"),
        (DeadlineExceeded("the rate-limit wait would outlive the attempt"), "timeout"),
        (StorageError("connection refused"), "storage_unavailable"),
        (ChecksumMismatch("sha256 differs"), "checksum_mismatch"),
        (ObjectMissing("no such key"), "object_missing"),
        (InvalidKey("invalid blob key"), "config_invalid"),
        (DatabaseUnavailable("connection refused"), "database_unavailable"),
        (ConfigError("synthetic config: unknown key 'x'"), "config_invalid"),
        (ConnectorError("connector 'rest' has no resource 'x'"), "config_invalid"),
        (TaskCancelled("task 1 was cancelled"), "cancelled"),
        (VersionChanged("partition published meanwhile"), "superseded"),
        (KeyError("surprise"), "internal"),
    ],
)
def test_each_task_failure_gets_its_documented_code(exc: BaseException, code: str) -> None:
    assert error_code(exc) == code
    assert code in CODES


def test_every_code_is_explained_in_plain_words_and_documented_in_troubleshooting() -> None:
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md").read_text()
    for code, words in CODES.items():
        assert explain(code) == words and words
        assert f"`{code}`" in guide, f"docs/troubleshooting.md does not document {code}"
    assert explain(None) == ""
