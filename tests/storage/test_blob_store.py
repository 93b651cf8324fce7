"""The BlobStore contract, run against the local directory store and the S3 store alike."""

from __future__ import annotations

import hashlib
import io
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pipeline.errors import ConfigError, ObjectMissing, StorageError
from storage.base import BlobStore
from storage.checksum import sha256_hex, sha256_stream
from storage.factory import open_store
from storage.local import LocalBlobStore
from storage.s3 import S3BlobStore
from tests.services import S3Service, free_port, unique_name

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MiB = 1024 * 1024


class GeneratedStream(io.RawIOBase):
    """``size`` pseudo-random bytes produced on demand: a stream whose length nobody announces."""

    def __init__(self, size: int, seed: int = 7) -> None:
        self._remaining = size
        self._random = random.Random(seed)
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        count = min(len(view), self._remaining)
        chunk = self._random.randbytes(count)
        view[:count] = chunk
        self.digest.update(chunk)
        self._remaining -= count
        return count


def keys_of(store: BlobStore, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix)]


def test_put_then_get_returns_the_same_bytes(blob_store: BlobStore) -> None:
    blob_store.put("acme/shifts/2024-05-01/abc.json", b'{"records": []}')

    assert blob_store.get("acme/shifts/2024-05-01/abc.json") == b'{"records": []}'
    assert b"".join(blob_store.open("acme/shifts/2024-05-01/abc.json")) == b'{"records": []}'


def test_put_accepts_a_stream_of_known_length(blob_store: BlobStore) -> None:
    blob_store.put("doc.json", io.BytesIO(b"0123456789"), length=10)

    assert blob_store.get("doc.json") == b"0123456789"


def test_empty_object_round_trips(blob_store: BlobStore) -> None:
    blob_store.put("empty.json", io.BytesIO(b""))

    assert blob_store.get("empty.json") == b""
    info = blob_store.stat("empty.json")
    assert info is not None and info.size == 0


def test_stat_reports_size_content_type_and_lowercased_metadata(blob_store: BlobStore) -> None:
    # No extension in the key: SeaweedFS guesses a Content-Type from one, and this must see ours.
    payload = b'[{"id": 1}, {"id": 2}, {"id": 3}]'
    blob_store.put(
        "acme/shifts/day",
        payload,
        content_type="application/json",
        metadata={"SHA256": sha256_hex(payload), "Record-Count": "3"},
    )

    info = blob_store.stat("acme/shifts/day")

    assert info is not None
    assert info.key == "acme/shifts/day"
    assert info.size == len(payload)
    assert info.content_type == "application/json"
    assert dict(info.metadata) == {"sha256": sha256_hex(payload), "record-count": "3"}
    assert info.last_modified.tzinfo is not None


def test_stat_of_a_missing_key_is_none(blob_store: BlobStore) -> None:
    assert blob_store.stat("nobody/here.json") is None


def test_stat_of_a_key_that_is_only_a_prefix_is_none(blob_store: BlobStore) -> None:
    blob_store.put("acme/shifts/day.json", b"{}")

    assert blob_store.stat("acme/shifts") is None


def test_get_and_open_of_a_missing_key_raise_object_missing_naming_it(blob_store: BlobStore) -> None:
    with pytest.raises(ObjectMissing, match=re.escape("nobody/here.json")):
        blob_store.get("nobody/here.json")
    with pytest.raises(ObjectMissing, match=re.escape("nobody/here.json")):
        b"".join(blob_store.open("nobody/here.json"))


def test_overwrite_replaces_content_and_metadata(blob_store: BlobStore) -> None:
    blob_store.put("doc.json", b"old", metadata={"sha256": sha256_hex(b"old")})
    blob_store.put("doc.json", io.BytesIO(b"new!"), metadata={"sha256": sha256_hex(b"new!")})

    assert blob_store.get("doc.json") == b"new!"
    info = blob_store.stat("doc.json")
    assert info is not None
    assert info.size == 4
    assert info.metadata["sha256"] == sha256_hex(b"new!")
    assert keys_of(blob_store) == ["doc.json"]


def test_readers_never_see_a_partial_overwrite(blob_store: BlobStore) -> None:
    versions = [bytes([byte]) * (2 * MiB) for byte in b"ab"]
    blob_store.put("doc.json", versions[0])
    seen: set[bytes] = set()
    listings: set[tuple[str, ...]] = set()
    writing = threading.Event()
    writing.set()

    def read_while_writing() -> None:
        while writing.is_set():
            seen.add(blob_store.get("doc.json"))
            listings.add(tuple(keys_of(blob_store)))

    reader = threading.Thread(target=read_while_writing)
    reader.start()
    try:
        for round_ in range(12):
            blob_store.put("doc.json", io.BytesIO(versions[round_ % 2]))
    finally:
        writing.clear()
        reader.join(timeout=30)

    assert not reader.is_alive()
    assert seen <= set(versions)
    assert listings == {("doc.json",)}


def test_list_filters_by_prefix_in_key_order(blob_store: BlobStore) -> None:
    for key in ["b/2.json", "a/2/x.json", "a/1.json", "a/10.json", "ab.json", "c.json"]:
        blob_store.put(key, key.encode(), metadata={"sha256": sha256_hex(key.encode())})

    assert keys_of(blob_store) == ["a/1.json", "a/10.json", "a/2/x.json", "ab.json", "b/2.json", "c.json"]
    assert keys_of(blob_store, "a/") == ["a/1.json", "a/10.json", "a/2/x.json"]
    assert keys_of(blob_store, "a/1") == ["a/1.json", "a/10.json"]
    assert keys_of(blob_store, "a") == ["a/1.json", "a/10.json", "a/2/x.json", "ab.json"]
    assert keys_of(blob_store, "zzz/") == []
    sizes = {info.key: info.size for info in blob_store.list("b/")}
    assert sizes == {"b/2.json": len(b"b/2.json")}


def test_delete_removes_the_object_and_is_idempotent(blob_store: BlobStore) -> None:
    blob_store.put("_staging/task-1/part-0001.json", b"[]")
    blob_store.put("_staging/task-2/part-0001.json", b"[]")

    blob_store.delete("_staging/task-1/part-0001.json")
    blob_store.delete("_staging/task-1/part-0001.json")
    blob_store.delete("never/existed.json")

    assert blob_store.stat("_staging/task-1/part-0001.json") is None
    assert keys_of(blob_store) == ["_staging/task-2/part-0001.json"]
    blob_store.put("_staging/task-1/part-0002.json", b"[]")
    assert keys_of(blob_store, "_staging/task-1/") == ["_staging/task-1/part-0002.json"]


def test_streaming_put_of_unknown_length_then_streaming_open_in_bounded_chunks(
    blob_store: BlobStore,
) -> None:
    size = 40 * MiB
    source = GeneratedStream(size)

    blob_store.put("big/document.json", io.BufferedReader(source, buffer_size=MiB))

    info = blob_store.stat("big/document.json")
    assert info is not None and info.size == size
    largest = 0

    def chunks() -> Iterator[bytes]:
        nonlocal largest
        for chunk in blob_store.open("big/document.json"):
            largest = max(largest, len(chunk))
            yield chunk

    digest, read = sha256_stream(chunks())
    assert (digest, read) == (source.digest.hexdigest(), size)
    assert 0 < largest <= MiB


def test_put_fails_when_a_stream_is_shorter_than_its_announced_length(blob_store: BlobStore) -> None:
    with pytest.raises(StorageError, match=re.escape("short.json")):
        blob_store.put("short.json", io.BytesIO(b"123"), length=10)

    assert blob_store.stat("short.json") is None
    assert keys_of(blob_store) == []


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "a/../b", "..", "a//b", "a/", "a\\b", ".hidden", "a/.b.json.meta.json", "a/./b"],
)
def test_invalid_keys_are_rejected_naming_the_key(blob_store: BlobStore, key: str) -> None:
    for operation in (
        lambda: blob_store.put(key, b"x"),
        lambda: blob_store.get(key),
        lambda: blob_store.stat(key),
        lambda: blob_store.delete(key),
    ):
        with pytest.raises(StorageError) as raised:
            operation()
        assert repr(key) in str(raised.value)
        assert not isinstance(raised.value, ObjectMissing)


def test_metadata_that_cannot_travel_as_an_http_header_is_rejected(blob_store: BlobStore) -> None:
    with pytest.raises(StorageError, match="record count"):
        blob_store.put("doc.json", b"{}", metadata={"record count": "3"})
    with pytest.raises(StorageError, match="note"):
        blob_store.put("doc.json", b"{}", metadata={"note": "caf\u00e9"})

    assert blob_store.stat("doc.json") is None


def test_ping_succeeds_on_a_reachable_store(blob_store: BlobStore) -> None:
    blob_store.ping()


# --- one store at a time ------------------------------------------------------------------------


def test_local_store_lists_neither_sidecars_nor_leftover_temporary_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    store.put("acme/day.json", b"{}", metadata={"sha256": sha256_hex(b"{}")})
    (tmp_path / "acme" / ".day.json.k2j4h1.tmp").write_bytes(b"{")  # as a crash mid-write leaves it

    assert sorted(path.name for path in (tmp_path / "acme").iterdir()) == [
        ".day.json.k2j4h1.tmp",
        ".day.json.meta.json",
        "day.json",
    ]
    assert keys_of(store) == ["acme/day.json"]


def test_local_store_removes_directories_emptied_by_delete(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    store.put("_staging/task-1/part-0001.json", b"[]")

    store.delete("_staging/task-1/part-0001.json")

    assert list(tmp_path.iterdir()) == []


def test_local_store_ping_fails_when_its_directory_is_gone(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    (tmp_path / "blobs").rmdir()

    with pytest.raises(StorageError, match="blobs"):
        store.ping()


def test_s3_store_on_a_closed_port_fails_within_seconds_naming_the_endpoint() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    started = time.monotonic()

    with pytest.raises(StorageError, match=endpoint):
        S3BlobStore(endpoint=endpoint, access_key="k", secret_key="s", bucket="unreachable")

    assert time.monotonic() - started < 5


def test_s3_store_with_a_prefix_keeps_its_keys_under_it(s3_service: S3Service, s3_bucket: str) -> None:
    tenant = s3_service.store(s3_bucket, prefix="tenant-a")
    whole = s3_service.store(s3_bucket)
    whole.put("outside.json", b"{}")

    tenant.put("day.json", b"[]")

    assert tenant.url == f"s3://{s3_bucket}/tenant-a"
    assert keys_of(tenant) == ["day.json"]
    assert keys_of(whole) == ["outside.json", "tenant-a/day.json"]
    assert tenant.get("day.json") == b"[]"


def test_s3_store_creates_its_bucket_when_missing(s3_service: S3Service) -> None:
    bucket = unique_name("pipeline-test", separator="-")
    store = S3BlobStore(
        endpoint=f"http://{s3_service.endpoint}",
        access_key=s3_service.access_key,
        secret_key=s3_service.secret_key,
        bucket=bucket,
    )
    try:
        store.ping()
        s3_service.store(bucket).ping()  # as a second process finds it: already there
    finally:
        s3_service.client().remove_bucket(bucket)


# --- factory -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["ftp://host/blobs", "blobs", "/var/blobs", "s3://", "file://otherhost/blobs", "file://", "s3://b?x=1"],
)
def test_open_store_rejects_an_unsupported_url_naming_it(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        open_store(url, endpoint="127.0.0.1:9")

    assert repr(url) in str(raised.value)


def test_open_store_s3_url_without_endpoint_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="s3://pipeline"):
        open_store("s3://pipeline")


def test_open_store_file_urls_absolute_and_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    absolute = open_store(f"file://{tmp_path}/abs")
    relative = open_store("file://./rel/blobs")

    assert isinstance(absolute, LocalBlobStore) and absolute.root == tmp_path / "abs"
    assert isinstance(relative, LocalBlobStore) and relative.root == tmp_path / "rel" / "blobs"
    assert relative.url == (tmp_path / "rel" / "blobs").as_uri()


def test_open_store_s3_url_with_prefix(s3_service: S3Service, s3_bucket: str) -> None:
    store = open_store(
        f"s3://{s3_bucket}/tenant-a",
        endpoint=s3_service.endpoint,
        access_key=s3_service.access_key,
        secret_key=s3_service.secret_key,
        secure=s3_service.secure,
    )

    assert isinstance(store, S3BlobStore)
    assert store.url == f"s3://{s3_bucket}/tenant-a"
    store.ping()
