"""One error tree for the whole product, and the one place failures are classified.

It lives below ``storage/`` and ``connectors/`` (the boundaries raise these) and below
``pipeline/`` (which re-exports every name from ``pipeline.errors``). HTTP status codes are
chosen only in the API layer; everything below raises one of these.

Every failure has a :class:`FailureKind`, decided where it is raised:

- ``OUTAGE``: a service we depend on is down (blob storage, the database). The attempt costs
  nothing and is retried for at most ``PIPELINE_OUTAGE_RETRY_S``.
- ``RETRYABLE``: this attempt failed, another may succeed; it spends an attempt.
- ``PERMANENT``: another attempt would fail the same way (bad config, bad upstream data);
  the task fails now, with a message naming the key or record.

Anything not classified — an exception type of ours without a kind, a bug, a library error we
did not translate — is ``RETRYABLE``: it spends attempts, so it ends, and it is never taken for
an outage (which would retry it without spending any).
"""

from __future__ import annotations

import enum
from typing import ClassVar


class FailureKind(enum.StrEnum):
    OUTAGE = "outage"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


class PipelineError(Exception):
    """Root of every error the product raises on purpose.

    ``kind`` is the class's default classification; pass ``kind=`` to override it where the
    raiser knows better (e.g. a storage error that is a bad key, not an unreachable store).
    """

    default_kind: ClassVar[FailureKind] = FailureKind.RETRYABLE

    def __init__(self, *args: object, kind: FailureKind | None = None) -> None:
        super().__init__(*args)
        self.kind: FailureKind = kind if kind is not None else self.default_kind


class ConfigError(PipelineError):
    """A setting, a company's connector config or a CLI argument is invalid."""

    default_kind = FailureKind.PERMANENT


class ForbiddenUpstream(ConfigError):
    """A config names an upstream the operator's network policy refuses (an IP literal outside
    ``PIPELINE_UPSTREAM_ALLOWLIST``): the request is well formed, the policy forbids it."""


class RequestConflict(PipelineError):
    """A well-formed request the current state refuses (``immediate`` over its task limit: the
    same body runs with fewer tasks in scope); the message names the field. The API answers 409
    ``conflict``."""

    default_kind = FailureKind.PERMANENT


class NotFound(PipelineError):
    """A company, job, task or dataset does not exist."""

    default_kind = FailureKind.PERMANENT


class ConnectorError(PipelineError):
    """A connector is misconfigured or misbehaves (unknown resource, bad transform, bad record)."""

    default_kind = FailureKind.PERMANENT


class UpstreamError(ConnectorError):
    """The upstream API answered with an error or with data we cannot read.

    ``retryable`` tells whether another attempt may succeed (5xx, 429, connection errors)
    or not (401, a malformed page, ``IsSuccess: false``); it sets ``kind``.
    """

    def __init__(
        self, message: str, *, retryable: bool = False, status: int | None = None, kind: FailureKind | None = None
    ) -> None:
        super().__init__(message, kind=kind or (FailureKind.RETRYABLE if retryable else FailureKind.PERMANENT))
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.kind is not FailureKind.PERMANENT


class BadRecord(ConnectorError):
    """A record the upstream sent cannot be stored (wrong type, unusable primary key, ...).

    Deterministic: the same page gives the same record on every attempt, so it is permanent.
    """


class StorageError(PipelineError):
    """The blob store could not be reached or refused an operation (an outage by default)."""

    default_kind = FailureKind.OUTAGE


class StorageAuthError(StorageError):
    """The S3 service rejected our credentials (bad signature, unknown or revoked key, access
    denied): a configuration error, so neither an outage to wait out nor worth another attempt."""

    default_kind = FailureKind.PERMANENT


class InvalidKey(StorageError):
    """A blob key, prefix or metadata entry breaks the store's naming rules: a bug or bad
    config, never an outage."""

    default_kind = FailureKind.PERMANENT


class ObjectMissing(StorageError):
    """An object that should exist is not in the blob store."""

    default_kind = FailureKind.RETRYABLE


class ChecksumMismatch(StorageError):
    """Bytes read from the blob store do not hash to the recorded SHA-256."""

    default_kind = FailureKind.RETRYABLE


class DatabaseUnavailable(PipelineError):
    """The database cannot be reached (connection refused, dropped, shutting down)."""

    default_kind = FailureKind.OUTAGE


class ServiceError(PipelineError):
    """A service the product depends on is unreachable, refuses our credentials or is not set up
    (the schema was never migrated). The message names the service, its URL and the fix; the
    CLI raises it before a command starts (``pipeline.preflight``)."""

    default_kind = FailureKind.PERMANENT


class TaskCancelled(PipelineError):
    """The task's job was cancelled; work stops at the chunk boundary."""

    default_kind = FailureKind.PERMANENT


class LeaseLost(PipelineError):
    """Another worker holds the task now; this worker must stop without writing."""

    default_kind = FailureKind.PERMANENT


class DeadlineExceeded(PipelineError):
    """The attempt's deadline passed (a rate-limit wait or a request would outlive it)."""

    default_kind = FailureKind.RETRYABLE


class VersionChanged(PipelineError):
    """Another task published the partition after this attempt's lineage started: its data
    may be older than what is current now, so it must not be published (the task starts over)."""

    default_kind = FailureKind.RETRYABLE


class AuthError(PipelineError):
    """A bearer token is missing, malformed, expired, badly signed or lacks a required claim."""

    default_kind = FailureKind.PERMANENT


class IdentityProviderUnavailable(PipelineError):
    """The identity provider's key set (``PIPELINE_JWKS_URL``) could not be fetched: no verdict on a token."""

    default_kind = FailureKind.OUTAGE


def classify(exc: BaseException) -> FailureKind:
    """The kind of a failure: the kind its raiser gave it, else ``RETRYABLE``.

    The one classifier of the product. It does not guess from foreign exception types:
    database errors are translated into :class:`DatabaseUnavailable` (or not) where the
    database is called, blob and HTTP errors by the boundaries.
    """
    if isinstance(exc, PipelineError):
        return exc.kind
    return FailureKind.RETRYABLE
