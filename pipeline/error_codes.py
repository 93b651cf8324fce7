"""Machine-readable codes for task and job errors: the one place that maps exceptions to them.

A task's error is recorded as ``{"code", "message"}``: the message stays the readable text
(``pipeline.execution.describe``), the code says what kind of failure it was, so a console,
a client or an alert can react without parsing prose. ``error_code`` is called where a task
error is recorded; the code is stored in ``sync_tasks.error_code`` (migration 0005).

The set is small and documented in ``docs/troubleshooting.md``. ``TABLE`` is its one source:
each code with the plain words the console shows next to the message and the exception classes
it is given to; ``CODES`` and the class lookup are derived from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """One code: its name, the plain words that explain it, and the exception classes it is
    given to (their subclasses too; the most specific class listed anywhere wins)."""

    name: str
    words: str
    raised_as: tuple[type[BaseException], ...] = ()


TABLE: tuple[ErrorCode, ...] = (
    # An UpstreamError gets one of the upstream codes by what it says (``_upstream_code``).
    ErrorCode("upstream_auth", "the upstream refused our credentials (HTTP 401/403): fix the company's auth config"),
    ErrorCode("upstream_rejected", "the upstream rejected the request (an HTTP 4xx other than 401, 403 and 429)"),
    ErrorCode("upstream_malformed", "the upstream answered with data we cannot read (a malformed page or record)",
              (BadRecord,)),
    ErrorCode("upstream_unavailable", "the upstream failed or could not be reached (HTTP 5xx, connection errors)"),
    ErrorCode("rate_limited", "the upstream kept answering 429 Too Many Requests"),
    ErrorCode("timeout", "the upstream did not answer in time", (DeadlineExceeded,)),
    ErrorCode("storage_unavailable", "the blob store could not be reached", (StorageError,)),
    ErrorCode("checksum_mismatch", "stored bytes did not match their SHA-256 checksum", (ChecksumMismatch,)),
    ErrorCode("object_missing", "an object the pipeline needed is missing from the blob store", (ObjectMissing,)),
    ErrorCode("database_unavailable", "the database could not be reached",
              (DatabaseUnavailable, OperationalError, InterfaceError)),
    ErrorCode("config_invalid", "the company's connector config is invalid (the message names the key)",
              (ConfigError, ConnectorError, InvalidKey)),
    ErrorCode("superseded", "another sync published this partition while the task ran; the task starts over",
              (VersionChanged,)),
    ErrorCode("cancelled", "the job was cancelled", (TaskCancelled,)),
    # Recorded by the code that detects them, not raised: a lost worker (jobs.fail_exhausted), a job's summary.
    ErrorCode("worker_lost",
              "the worker running the task's last allowed attempt stopped (killed or lost) before it finished"),
    ErrorCode("tasks_failed", "some of the job's tasks failed; each failed task has its own error"),
    ErrorCode("internal", "an unexpected error inside the pipeline (see the worker's log)"),
)
"""Every code: the one source of the names, their words and the classes they are given to."""

CODES: dict[str, str] = {code.name: code.words for code in TABLE}
"""Every code, with the plain words that explain it."""

_BY_CLASS: dict[type[BaseException], str] = {cls: code.name for code in TABLE for cls in code.raised_as}

AUTH_STATUSES = frozenset({401, 403})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _timed_out(exc: BaseException) -> bool:
    return any(isinstance(cause, httpx.TimeoutException | TimeoutError) for cause in _chain(exc))


def _upstream_code(exc: UpstreamError) -> str:
    if exc.status in AUTH_STATUSES:
        return "upstream_auth"
    if exc.status == 429:
        return "rate_limited"
    if _timed_out(exc):
        return "timeout"
    if exc.retryable:
        return "upstream_unavailable"
    if exc.status is not None:
        return "upstream_rejected"
    return "upstream_malformed"


def error_code(exc: BaseException) -> str:
    """The code for a task failure ``exc`` (one of ``CODES``): that of the most specific class of
    ``exc`` in ``TABLE``; an ``UpstreamError`` by its status and cause; otherwise ``timeout`` if a
    timeout caused it, else ``internal``."""
    for cls in type(exc).__mro__:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
        if cls is UpstreamError and isinstance(exc, UpstreamError):
            return _upstream_code(exc)
    return "timeout" if any(isinstance(cause, TimeoutError) for cause in _chain(exc)) else "internal"


def explain(code: str | None) -> str:
    """The plain words for ``code`` (empty for ``None``; the code itself if unknown)."""
    if code is None:
        return ""
    return CODES.get(code, code)
