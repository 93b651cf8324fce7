"""The product's error tree, re-exported for ``pipeline`` code: it lives in :mod:`errors`,
below the boundaries (``storage/``, ``connectors/``) that raise most of it."""

from __future__ import annotations

from errors import (
    AuthError,
    BadRecord,
    ChecksumMismatch,
    ConfigError,
    ConnectorError,
    DatabaseUnavailable,
    DeadlineExceeded,
    FailureKind,
    IdentityProviderUnavailable,
    InvalidKey,
    LeaseLost,
    NotFound,
    ObjectMissing,
    PipelineError,
    StorageError,
    TaskCancelled,
    UpstreamError,
    VersionChanged,
    classify,
)

__all__ = [
    "AuthError",
    "BadRecord",
    "ChecksumMismatch",
    "ConfigError",
    "ConnectorError",
    "DatabaseUnavailable",
    "DeadlineExceeded",
    "FailureKind",
    "IdentityProviderUnavailable",
    "InvalidKey",
    "LeaseLost",
    "NotFound",
    "ObjectMissing",
    "PipelineError",
    "StorageError",
    "TaskCancelled",
    "UpstreamError",
    "VersionChanged",
    "classify",
]
