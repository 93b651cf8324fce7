"""``storage.cache``: the size-bounded LRU of verified bytes and ``read_verified``."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from pipeline.errors import ChecksumMismatch, ObjectMissing
from storage.cache import ByteCache, read_verified
from storage.checksum import sha256_hex
from storage.local import LocalBlobStore


def test_least_recently_used_entries_go_first_when_the_byte_budget_is_exceeded() -> None:
    cache = ByteCache(max_bytes=10)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"  # a is now more recent than b
    cache.put("c", b"cccc")
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.size_bytes == 8 <= cache.max_bytes


def test_hits_and_misses_are_counted() -> None:
    cache = ByteCache(max_bytes=100)
    assert cache.get("x") is None
    cache.put("x", b"1")
    assert cache.get("x") == b"1"
    assert cache.get("x") == b"1"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.size_bytes) == (2, 1, 1, 1)


def test_a_value_larger_than_the_budget_is_not_cached_and_evicts_nothing() -> None:
    cache = ByteCache(max_bytes=4)
    cache.put("small", b"1234")
    cache.put("huge", b"12345")
    assert "huge" not in cache and cache.get("small") == b"1234"


def test_replacing_a_key_accounts_for_its_new_size() -> None:
    cache = ByteCache(max_bytes=10)
    cache.put("k", b"123456")
    cache.put("k", b"12")
    assert cache.size_bytes == 2 and len(cache) == 1


def test_concurrent_use_keeps_the_budget_and_the_counters_consistent() -> None:
    cache = ByteCache(max_bytes=1000)
    rounds = 2000

    def work(worker: int) -> None:
        for index in range(rounds):
            key = f"{(worker * 7 + index) % 50}"
            if cache.get(key) is None:
                cache.put(key, key.encode() * 10)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats()
    assert stats.hits + stats.misses == 8 * rounds
    assert stats.size_bytes <= 1000
    assert stats.size_bytes == sum(len(cache.get(str(k)) or b"") for k in range(50) if str(k) in cache)


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def test_read_verified_checks_once_then_serves_from_the_cache(store: LocalBlobStore) -> None:
    payload = b'{"jobs":[]}'
    checksum = sha256_hex(payload)
    store.put("1/schedule/d/x.json", payload)
    cache = ByteCache(max_bytes=1024)
    assert read_verified(store, "1/schedule/d/x.json", checksum, cache) == payload
    store.delete("1/schedule/d/x.json")
    assert read_verified(store, "1/schedule/d/x.json", checksum, cache) == payload
    assert (cache.hits, cache.misses) == (1, 1)


def test_read_verified_refuses_bytes_that_do_not_match_and_never_caches_them(store: LocalBlobStore) -> None:
    store.put("1/schedule/d/x.json", b'{"tampered":true}')
    cache = ByteCache(max_bytes=1024)
    expected = sha256_hex(b'{"jobs":[]}')
    with pytest.raises(ChecksumMismatch, match=re.escape("1/schedule/d/x.json")) as raised:
        read_verified(store, "1/schedule/d/x.json", expected, cache)
    assert expected in str(raised.value)
    assert len(cache) == 0


def test_read_verified_of_a_missing_object_raises_object_missing(store: LocalBlobStore) -> None:
    with pytest.raises(ObjectMissing):
        read_verified(store, "1/schedule/d/none.json", "0" * 64, ByteCache(max_bytes=1024))
