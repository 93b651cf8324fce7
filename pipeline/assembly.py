"""Assembling a document from its chunks in bounded memory.

Each chunk becomes one run sorted by primary key (in memory when there is a single chunk,
else in a temporary NDJSON file); the runs are merged with ``heapq.merge``, keeping the record
from the latest run for each key (later chunks and incremental changes win). The document is
rendered in a stream into a spooled temporary file while it is hashed, so a partition of a
million records needs memory for one chunk, not for the document. At most ``MERGE_FAN_IN``
runs are open at once: beyond that, consecutive runs are first merged into bigger ones
(defect 10: a thousand chunks used to exhaust file descriptors).

Records the upstream sent that cannot be stored (not an object, no or an unusable primary key,
an integer beyond 64 bits) raise ``BadRecord``, which is permanent: the same page gives the
same record on every attempt (defect 15).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

import orjson

from connectors.base import Record
from connectors.transforms import TransformSpec, render, sort_key
from pipeline.errors import BadRecord

SPOOL_BYTES = 8 * 1024 * 1024
RENDER_BATCH_BYTES = 64 * 1024
MERGE_FAN_IN = 64


def _key_of(record: Any, primary_key: str, position: int) -> Any:
    """The primary key of ``record``: a string or a number.

    Raises:
        BadRecord: naming the record's position and what is wrong with it.
    """
    if not isinstance(record, dict):
        raise BadRecord(f"record #{position} is a JSON {_json_type(record)}, expected an object")
    value = record.get(primary_key)
    if value is None:
        raise BadRecord(f"record #{position} has no primary key {primary_key!r}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRecord(f"record #{position}: primary key {primary_key!r} is a JSON {_json_type(value)}, "
                        "expected a string or a number")
    return value


def check_records(records: Iterable[Any], primary_key: str, *, first: int = 0) -> None:
    """Check every record has a usable primary key (see ``_key_of``); ``first`` numbers them.

    Raises:
        BadRecord: for the first record that does not.
    """
    for position, record in enumerate(records, first):
        _key_of(record, primary_key, position)


def encode_record(record: Any, position: int, *, option: int | None = None) -> bytes:
    """One record as JSON bytes.

    Raises:
        BadRecord: the record holds what JSON cannot carry here (an integer beyond 64 bits,
            a lone surrogate, a non-string key).
    """
    try:
        return orjson.dumps(record, option=option)
    except orjson.JSONEncodeError as exc:
        raise BadRecord(f"record #{position} cannot be stored: {exc}") from exc


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "number" if isinstance(value, int | float) else type(value).__name__


@dataclass
class SortedRuns:
    """Runs of records sorted by primary key, merged and deduplicated on read."""

    primary_key: str
    directory: str | None = None
    _memory: list[list[Record]] = field(default_factory=list)
    _sources: list[Callable[[], Iterable[Record]]] = field(default_factory=list)
    _files: list[str] = field(default_factory=list)
    _seen: int = 0

    def add_sorted(self, source: Callable[[], Iterable[Record]]) -> None:
        """Add a run that is already sorted and deduplicated by key, read afresh on every merge
        (e.g. the raw records of the current version, streamed from the blob store)."""
        self._sources.append(source)

    def add(self, records: Iterable[Record], *, spill: bool = True) -> None:
        """Add one run (e.g. one chunk); within it the last record of each key wins."""
        by_key: dict[Any, Record] = {}
        for record in records:
            by_key[_key_of(record, self.primary_key, self._seen)] = record
            self._seen += 1
        run = [by_key[key] for key in sorted(by_key, key=sort_key)]
        if not spill:
            self._memory.append(run)
            return
        self._files.append(self._spill(run))

    def _spill(self, records: Iterable[Record]) -> str:
        handle, path = tempfile.mkstemp(prefix="run-", suffix=".ndjson", dir=self.directory)
        with os.fdopen(handle, "wb") as out:
            for position, record in enumerate(records):
                out.write(encode_record(record, position) + b"\n")
        return path

    def _read(self, path: str) -> Iterator[Record]:
        with open(path, "rb") as source:
            for line in source:
                yield orjson.loads(line)

    def _compact(self) -> None:
        """Merge consecutive spilled runs until at most ``MERGE_FAN_IN`` remain (order kept)."""
        while len(self._files) > MERGE_FAN_IN:
            merged: list[str] = []
            for start in range(0, len(self._files), MERGE_FAN_IN):
                group = self._files[start:start + MERGE_FAN_IN]
                if len(group) == 1:
                    merged.append(group[0])
                    continue
                merged.append(self._spill(self._merge([self._read(path) for path in group])))
                for path in group:
                    os.unlink(path)
            self._files = merged

    def merged(self) -> Iterator[Record]:
        """Every key once, in key order, from the latest run that has it."""
        self._compact()
        # Order matters: later runs win. Sorted sources (the previous version) come first.
        runs: list[Iterable[Record]] = [
            *(source() for source in self._sources), *self._memory, *(self._read(path) for path in self._files)
        ]
        if len(runs) == 1:
            yield from runs[0]
            return
        yield from self._merge(runs)

    def _merge(self, runs: list[Iterable[Record]]) -> Iterator[Record]:
        # Merge on (key, -run): the latest run's record of a key comes first; the rest are dropped.
        def tag(index: int, run: Iterable[Record]) -> Iterator[tuple[tuple[Any, int], Record]]:
            for record in run:
                yield (sort_key(record[self.primary_key]), -index), record

        last: Any = object()
        for (key, _), record in heapq.merge(*(tag(i, run) for i, run in enumerate(runs)), key=lambda item: item[0]):
            if key != last:
                last = key
                yield record

    def close(self) -> None:
        for path in self._files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._files.clear()
        self._memory.clear()
        self._sources.clear()


@dataclass
class RenderedDocument:
    """A rendered document: its SHA-256, size and record count, and the bytes in a spooled file."""

    checksum: str
    size: int
    record_count: int
    file: BinaryIO

    def open(self) -> BinaryIO:
        self.file.seek(0)
        return self.file

    def read(self) -> bytes:
        return self.open().read()

    def close(self) -> None:
        self.file.close()


def render_document(
    spec: TransformSpec, company_id: int, resource: str, partition: str,
    records: Callable[[], Iterable[Record]], *, directory: str | None = None,
) -> RenderedDocument:
    """Render and hash the document in one stream; small documents never touch the disk."""
    digest = hashlib.sha256()
    size = 0
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, dir=directory)
    count = 0

    def counted() -> Iterator[Record]:
        nonlocal count
        count = 0
        for record in records():
            count += 1
            yield record

    pending: list[bytes] = []
    pending_size = 0

    def flush() -> None:
        nonlocal pending_size
        joined = b"".join(pending)
        digest.update(joined)
        out.write(joined)
        pending.clear()
        pending_size = 0

    try:
        # Blocks (a row each) are hashed and written in batches of ~RENDER_BATCH_BYTES: one
        # call each instead of one per row.
        for block in render(spec, company_id, resource, partition, counted):
            pending.append(block)
            pending_size += len(block)
            size += len(block)
            if pending_size >= RENDER_BATCH_BYTES:
                flush()
        flush()
    except orjson.JSONEncodeError as exc:
        out.close()
        raise BadRecord(f"record #{count} cannot be stored: {exc}") from exc
    except BaseException:
        out.close()
        raise
    return RenderedDocument(checksum=digest.hexdigest(), size=size, record_count=count, file=cast(BinaryIO, out))


def write_ndjson(records: Iterable[Record], *, directory: str | None = None) -> RenderedDocument:
    """Spool records as NDJSON (the raw records kept beside an incremental resource's document)."""
    digest = hashlib.sha256()
    size = count = 0
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, dir=directory)
    for record in records:
        line = encode_record(record, count, option=orjson.OPT_SORT_KEYS) + b"\n"
        digest.update(line)
        out.write(line)
        size += len(line)
        count += 1
    return RenderedDocument(checksum=digest.hexdigest(), size=size, record_count=count, file=cast(BinaryIO, out))


def read_ndjson(blocks: Iterable[bytes]) -> Iterator[Record]:
    """Parse NDJSON from a stream of byte blocks (lines may span blocks).

    The blocks are read as one buffered stream and iterated by line (``io.BufferedReader``),
    so a line spanning many blocks costs its length once, not once per block.
    """
    for line in io.BufferedReader(_BlockStream(iter(blocks)), buffer_size=READ_BUFFER):
        if line.strip():
            yield orjson.loads(line)


READ_BUFFER = 1024 * 1024


class _BlockStream(io.RawIOBase):
    """An iterator of byte blocks as a readable raw stream."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._block = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._block:
            block = next(self._blocks, None)
            if block is None:
                return 0
            self._block = memoryview(block)
        size = min(len(buffer), len(self._block))
        buffer[:size] = self._block[:size]
        self._block = self._block[size:]
        return size
