"""A directory on the local disk as a ``BlobStore``: the embedded default and the S3 store's twin."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from errors import FailureKind, ObjectMissing, StorageError
from storage.base import ObjectInfo
from storage.keys import normalize_metadata, validate_key, validate_prefix

CHUNK_SIZE = 1024 * 1024
_SIDECAR_SUFFIX = ".meta.json"
_CREATE_ATTEMPTS = 3


class LocalBlobStore:
    """Objects are plain files under ``root``, so the tree can be browsed and copied as is.

    Each object ``a/b.json`` has a hidden sidecar ``a/.b.json.meta.json`` holding its content
    type and metadata. Names starting with ``.`` are never keys (see ``storage.keys``), so
    sidecars and in-flight temporary files never appear in ``list``.

    A write goes to a temporary file in the target directory, is fsynced, and replaces the
    target with ``os.replace``: readers see the old bytes or the new ones, never a mix. The
    sidecar is replaced just before the data, so whoever sees the new bytes also sees their
    metadata.

    Unlike S3, a key cannot also be the directory of other keys (``a`` and ``a/b``): such a
    ``put`` raises ``StorageError``. The product's keys never collide this way.

    Parameters:
        root: the directory holding the objects; created if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create blob directory {self.root}: {exc}") from exc
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        length: int | None = None,
        content_type: str = "application/json",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        path = self._path(key)
        sidecar = json.dumps(
            {"content_type": content_type, "metadata": normalize_metadata(metadata)}, sort_keys=True
        ).encode()
        data_tmp: Path | None = None
        sidecar_tmp: Path | None = None
        try:
            data_tmp = self._write_temp(key, path, data, length)
            sidecar_tmp = self._write_temp(key, _sidecar_path(path), sidecar, None)
            os.replace(sidecar_tmp, _sidecar_path(path))
            sidecar_tmp = None
            os.replace(data_tmp, path)
            data_tmp = None
            _fsync_directory(path.parent)
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot write blob {key!r} under {self.url}: {exc}") from exc
        finally:
            for leftover in (data_tmp, sidecar_tmp):
                if leftover is not None:
                    _remove_quietly(leftover)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectMissing(f"blob {key!r} does not exist in {self.url}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read blob {key!r} from {self.url}: {exc}") from exc

    def open(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectMissing(f"blob {key!r} does not exist in {self.url}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read blob {key!r} from {self.url}: {exc}") from exc
        return self._chunks(key, handle)

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            status = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"cannot stat blob {key!r} in {self.url}: {exc}") from exc
        if not path.is_file():
            return None
        content_type, metadata = self._read_sidecar(key, path)
        return ObjectInfo(
            key=key,
            size=status.st_size,
            last_modified=datetime.fromtimestamp(status.st_mtime, tz=UTC),
            metadata=metadata,
            content_type=content_type,
        )

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
            _sidecar_path(path).unlink(missing_ok=True)
        except IsADirectoryError:
            return
        except OSError as exc:
            raise StorageError(f"cannot delete blob {key!r} from {self.url}: {exc}") from exc
        self._prune_empty_parents(path.parent)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield key, size and modification time; metadata is left empty as S3 listings carry none."""
        validate_prefix(prefix)
        directory = self.root.joinpath(*prefix.split("/")[:-1])
        keys: list[tuple[str, os.stat_result]] = []
        try:
            for current, dirnames, filenames in os.walk(directory):
                dirnames[:] = [name for name in dirnames if not name.startswith(".")]
                relative = Path(current).relative_to(self.root).as_posix()
                for name in filenames:
                    if name.startswith("."):
                        continue
                    key = name if relative == "." else f"{relative}/{name}"
                    if key.startswith(prefix):
                        keys.append((key, os.stat(os.path.join(current, name))))
        except OSError as exc:
            raise StorageError(f"cannot list {prefix!r} in {self.url}: {exc}") from exc
        for key, status in sorted(keys, key=lambda item: item[0]):
            yield ObjectInfo(
                key=key,
                size=status.st_size,
                last_modified=datetime.fromtimestamp(status.st_mtime, tz=UTC),
            )

    def ping(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"blob directory {self.root} is missing or not writable")

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _chunks(self, key: str, handle: BinaryIO) -> Iterator[bytes]:
        with handle:
            try:
                while chunk := handle.read(CHUNK_SIZE):
                    yield chunk
            except OSError as exc:
                raise StorageError(f"cannot read blob {key!r} from {self.url}: {exc}") from exc

    def _read_sidecar(self, key: str, path: Path) -> tuple[str | None, dict[str, str]]:
        try:
            raw = json.loads(_sidecar_path(path).read_bytes())
        except FileNotFoundError:
            # A file copied into the tree by hand has no sidecar; it is still an object.
            return None, {}
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read metadata of blob {key!r} in {self.url}: {exc}") from exc
        if not isinstance(raw, dict):
            raise StorageError(f"metadata of blob {key!r} in {self.url} is not a JSON object",
                               kind=FailureKind.RETRYABLE)
        content_type = raw.get("content_type")
        metadata = raw.get("metadata") or {}
        return (str(content_type) if content_type else None), {
            str(name): str(value) for name, value in metadata.items()
        }

    def _write_temp(self, key: str, target: Path, data: bytes | BinaryIO, length: int | None) -> Path:
        """Write ``data`` to a hidden temporary sibling of ``target``, fsynced; return its path."""
        fd, temp = self._create_temp(target)
        try:
            with os.fdopen(fd, "wb") as out:
                written = _copy(data, out, length)
                out.flush()
                os.fsync(out.fileno())
            if length is not None and written != length:
                raise StorageError(f"blob {key!r}: the data has {written} bytes, {length} announced",
                                   kind=FailureKind.RETRYABLE)
        except BaseException:
            _remove_quietly(temp)
            raise
        return temp

    def _create_temp(self, target: Path) -> tuple[int, Path]:
        for attempt in range(1, _CREATE_ATTEMPTS + 1):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            except FileNotFoundError:
                # A concurrent delete pruned the parent directory between mkdir and mkstemp.
                if attempt == _CREATE_ATTEMPTS:
                    raise
                continue
            return fd, Path(name)
        raise AssertionError("unreachable")

    def _prune_empty_parents(self, directory: Path) -> None:
        """Remove directories emptied by a delete, so finished staging areas leave no trace."""
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent


def _copy(data: bytes | BinaryIO, out: BinaryIO, length: int | None) -> int:
    if isinstance(data, bytes):
        payload = data if length is None else data[:length]
        out.write(payload)
        return len(payload)
    written = 0
    while length is None or written < length:
        want = CHUNK_SIZE if length is None else min(CHUNK_SIZE, length - written)
        chunk = data.read(want)
        if not chunk:
            break
        out.write(chunk)
        written += len(chunk)
    return written


def _sidecar_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{_SIDECAR_SUFFIX}")


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; without it a crash can resurrect the old file."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
