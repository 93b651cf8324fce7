"""The read cache: verified object bytes kept in memory, keyed by their checksum.

Objects are immutable and content-addressed, so an entry never goes stale: the only reasons to
drop one are size (least recently used first) and a dataset pointing elsewhere (the old entry
then simply ages out).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cachetools import LRUCache

from errors import ChecksumMismatch
from storage.base import BlobStore
from storage.checksum import sha256_hex


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of a ``ByteCache``'s counters."""

    entries: int
    size_bytes: int
    max_bytes: int
    hits: int
    misses: int


class ByteCache:
    """A thread-safe LRU cache of ``bytes`` bounded by their total size: ``cachetools.LRUCache``
    weighed by ``len``, behind a lock, with hit and miss counters.

    A value larger than the whole budget is not stored (``put`` is then a no-op), so one huge
    object cannot flush everything else.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: LRUCache[str, bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        """Return the cached value and mark it recently used, or ``None`` (counted as a miss)."""
        with self._lock:
            try:
                value = self._entries[key]
            except KeyError:
                self._misses += 1
                return None
            self._hits += 1
            return value

    def put(self, key: str, value: bytes) -> None:
        """Store ``value``, evicting the least recently used entries until it fits."""
        if len(value) > self.max_bytes:
            return
        with self._lock:
            self._entries[key] = value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return int(self._entries.currsize)

    @property
    def hits(self) -> int:
        with self._lock:
            return self._hits

    @property
    def misses(self) -> int:
        with self._lock:
            return self._misses

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                entries=len(self._entries),
                size_bytes=int(self._entries.currsize),
                max_bytes=self.max_bytes,
                hits=self._hits,
                misses=self._misses,
            )


def read_verified(store: BlobStore, key: str, checksum: str, cache: ByteCache) -> bytes:
    """Return the bytes of object ``key``, which must hash to ``checksum``.

    The cache is consulted first (it only ever holds verified bytes, keyed by checksum); on a
    miss the object is fetched, its SHA-256 checked once, and only then cached.

    Parameters:
        store: where the object lives.
        key: the object's key in ``store``.
        checksum: the lowercase hex SHA-256 the dataset row recorded for it.
        cache: the verified-bytes cache.

    Raises:
        ChecksumMismatch: the stored bytes do not hash to ``checksum`` (they are not cached).
        ObjectMissing: the object does not exist.
        StorageError: the store could not be reached.

    Returns:
        The verified bytes.
    """
    cached = cache.get(checksum)
    if cached is not None:
        return cached
    data = store.get(key)
    actual = sha256_hex(data)
    if actual != checksum:
        raise ChecksumMismatch(f"object {key!r} ({len(data)} bytes) hashes to sha256 {actual}, expected {checksum}")
    cache.put(checksum, data)
    return data
