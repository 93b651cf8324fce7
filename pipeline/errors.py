"""One error tree for the whole product.

HTTP status codes are chosen only in the API layer; everything below raises one of these.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error the product raises on purpose."""


class ConfigError(PipelineError):
    """A setting, a company's connector config or a CLI argument is invalid."""


class NotFound(PipelineError):
    """A company, job, task or dataset does not exist."""


class ConnectorError(PipelineError):
    """A connector is misconfigured or misbehaves (unknown resource, bad transform)."""


class UpstreamError(ConnectorError):
    """The upstream API answered with an error or with data we cannot read.

    ``retryable`` tells whether another attempt may succeed (5xx, 429, connection errors)
    or not (401, a malformed page, ``IsSuccess: false``).
    """

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class StorageError(PipelineError):
    """The blob store could not be reached or refused an operation."""


class ObjectMissing(StorageError):
    """An object that should exist is not in the blob store."""


class ChecksumMismatch(StorageError):
    """Bytes read from the blob store do not hash to the recorded SHA-256."""


class TaskCancelled(PipelineError):
    """The task's job was cancelled; work stops at the chunk boundary."""


class LeaseLost(PipelineError):
    """Another worker holds the task now; this worker must stop without writing."""


class AuthError(PipelineError):
    """A bearer token is missing, malformed, expired, badly signed or lacks a required claim."""


class IdentityProviderUnavailable(PipelineError):
    """The identity provider's key set (``PIPELINE_JWKS_URL``) could not be fetched: no verdict on a token."""
