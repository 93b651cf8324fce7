"""Machine-readable codes for task and job errors: the one place that maps exceptions to them.

A task's error is recorded as ``{"code", "message"}``: the message stays the readable text
(``pipeline.execution.describe``), the code says what kind of failure it was, so a console,
a client or an alert can react without parsing prose. ``error_code`` is called where a task
error is recorded; the code is stored in ``sync_tasks.error_code`` (migration 0005).

The set is small and documented in ``docs/troubleshooting.md``; ``CODES`` maps each code to
the plain words the console shows next to the message.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
from sqlalchemy.exc import InterfaceError, OperationalError

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

CODES: dict[str, str] = {
    "upstream_auth": "the upstream refused our credentials (HTTP 401/403): fix the company's auth config",
    "upstream_rejected": "the upstream rejected the request (an HTTP 4xx other than 401, 403 and 429)",
    "upstream_malformed": "the upstream answered with data we cannot read (a malformed page or record)",
    "upstream_unavailable": "the upstream failed or could not be reached (HTTP 5xx, connection errors)",
    "rate_limited": "the upstream kept answering 429 Too Many Requests",
    "timeout": "the upstream did not answer in time",
    "storage_unavailable": "the blob store could not be reached",
    "checksum_mismatch": "stored bytes did not match their SHA-256 checksum",
    "object_missing": "an object the pipeline needed is missing from the blob store",
    "database_unavailable": "the database could not be reached",
    "config_invalid": "the company's connector config is invalid (the message names the key)",
    "superseded": "another sync published this partition while the task ran; the task starts over",
    "cancelled": "the job was cancelled",
    "worker_lost": "the worker running the task's last allowed attempt stopped (killed or lost) before it finished",
    "tasks_failed": "some of the job's tasks failed; each failed task has its own error",
    "internal": "an unexpected error inside the pipeline (see the worker's log)",
}
"""Every code, with the plain words that explain it."""

AUTH_STATUSES = frozenset({401, 403})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def error_code(exc: BaseException) -> str:
    """The code for a task failure ``exc`` (one of ``CODES``), judged by its type and cause chain."""
    if isinstance(exc, TaskCancelled):
        return "cancelled"
    if isinstance(exc, ChecksumMismatch):
        return "checksum_mismatch"
    if isinstance(exc, ObjectMissing):
        return "object_missing"
    if isinstance(exc, InvalidKey):
        return "config_invalid"
    if isinstance(exc, StorageError):
        return "storage_unavailable"
    if isinstance(exc, DatabaseUnavailable | OperationalError | InterfaceError):
        return "database_unavailable"
    if isinstance(exc, DeadlineExceeded):
        return "timeout"
    if isinstance(exc, VersionChanged):
        return "superseded"
    if isinstance(exc, BadRecord):
        return "upstream_malformed"
    if isinstance(exc, UpstreamError):
        if exc.status in AUTH_STATUSES:
            return "upstream_auth"
        if exc.status == 429:
            return "rate_limited"
        if any(isinstance(cause, httpx.TimeoutException | TimeoutError) for cause in _chain(exc)):
            return "timeout"
        if exc.retryable:
            return "upstream_unavailable"
        if exc.status is not None:
            return "upstream_rejected"
        return "upstream_malformed"
    if isinstance(exc, ConfigError | ConnectorError):
        return "config_invalid"
    if any(isinstance(cause, TimeoutError) for cause in _chain(exc)):
        return "timeout"
    return "internal"


def explain(code: str | None) -> str:
    """The plain words for ``code`` (empty for ``None``; the code itself if unknown)."""
    if code is None:
        return ""
    return CODES.get(code, code)
