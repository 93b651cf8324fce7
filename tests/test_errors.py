"""Every failure has one of three kinds; anything unclassified is retryable, never an outage."""

from __future__ import annotations

import pytest

from errors import (
    BadRecord,
    ChecksumMismatch,
    ConfigError,
    ConnectorError,
    DatabaseUnavailable,
    FailureKind,
    InvalidKey,
    ObjectMissing,
    PipelineError,
    StorageError,
    UpstreamError,
    classify,
)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (StorageError("bucket unreachable"), FailureKind.OUTAGE),
        (DatabaseUnavailable("connection refused"), FailureKind.OUTAGE),
        (InvalidKey("invalid blob key '..'"), FailureKind.PERMANENT),
        (ObjectMissing("gone"), FailureKind.RETRYABLE),
        (ChecksumMismatch("bad bytes"), FailureKind.RETRYABLE),
        (ConfigError("bad setting"), FailureKind.PERMANENT),
        (ConnectorError("unknown resource"), FailureKind.PERMANENT),
        (BadRecord("record #3 is a list"), FailureKind.PERMANENT),
        (UpstreamError("HTTP 503", retryable=True), FailureKind.RETRYABLE),
        (UpstreamError("HTTP 401"), FailureKind.PERMANENT),
        (PipelineError("something of ours"), FailureKind.RETRYABLE),
        (StorageError("short write", kind=FailureKind.RETRYABLE), FailureKind.RETRYABLE),
    ],
)
def test_each_error_is_classified_by_its_raiser(error: PipelineError, kind: FailureKind) -> None:
    assert classify(error) is kind


@pytest.mark.parametrize("error", [KeyError("x"), MemoryError(), OSError(24, "Too many open files"), TypeError("bug")])
def test_unclassified_failures_are_retryable_never_outages(error: BaseException) -> None:
    assert classify(error) is FailureKind.RETRYABLE


def test_upstream_error_retryable_flag_follows_its_kind() -> None:
    assert UpstreamError("HTTP 429", retryable=True).retryable
    assert not UpstreamError("IsSuccess false").retryable
