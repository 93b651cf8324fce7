"""The ``BlobStore`` boundary: five operations every store implements the same way."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What ``stat`` and ``list`` report about one object."""

    key: str
    size: int
    last_modified: datetime
    metadata: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None


@runtime_checkable
class BlobStore(Protocol):
    """Flat key → bytes storage (S3/MinIO or a local directory).

    Keys are ``/``-separated relative paths. Every method raises ``StorageError`` when the
    store cannot be reached and ``ObjectMissing`` when a key that must exist does not.
    """

    url: str

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        length: int | None = None,
        content_type: str = "application/json",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Store ``data`` at ``key`` atomically: readers see the old object or the whole new one.

        ``data`` may be a binary stream; ``length`` is then its size if known (unknown sizes
        are uploaded in parts).
        """
        ...

    def get(self, key: str) -> bytes:
        """Return the whole object. Raises ``ObjectMissing``."""
        ...

    def open(self, key: str) -> Iterator[bytes]:
        """Stream the object in chunks (bounded memory). Raises ``ObjectMissing``."""
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """Return the object's info, or ``None`` when it does not exist."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix``, in key order (recursive)."""
        ...

    def ping(self) -> None:
        """Raise ``StorageError`` unless the store answers (used by health checks)."""
        ...
