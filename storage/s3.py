"""S3 / MinIO as a ``BlobStore``, through the ``minio`` SDK."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from minio.helpers import DictType
from urllib3.exceptions import HTTPError
from urllib3.util import Retry, Timeout

from errors import ConfigError, InvalidKey, ObjectMissing, StorageAuthError, StorageError
from storage.base import ObjectInfo
from storage.keys import normalize_metadata, validate_key, validate_prefix

CHUNK_SIZE = 1024 * 1024
PART_SIZE = 16 * 1024 * 1024
"""Multipart part size for streams of unknown length; 10,000 parts make a 160 GiB ceiling."""

_METADATA_HEADER = "x-amz-meta-"
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject"})
# The service refused who we are, not what we asked: wrong secret, unknown or revoked key.
_AUTH_CODES = frozenset({"SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId", "InvalidToken",
                         "ExpiredToken", "AuthorizationHeaderMalformed"})


def http_client(*, connect_timeout: float = 2.0, read_timeout: float = 60.0) -> urllib3.PoolManager:
    """The HTTP pool the store uses: bounded timeouts and retries.

    minio's default pool waits 5 minutes per attempt and retries 5 times, so an unreachable
    endpoint would hang a worker or a health check for half an hour. Here a refused
    connection fails in well under a second and a silent host in about twice
    ``connect_timeout``; the read timeout leaves room for a slow 16 MiB part upload.
    """
    return urllib3.PoolManager(
        timeout=Timeout(connect=connect_timeout, read=read_timeout),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=certifi.where(),
        retries=Retry(
            total=3,
            connect=1,
            read=1,
            status=2,
            backoff_factor=0.2,
            status_forcelist=[500, 502, 503, 504],
        ),
    )


class S3BlobStore:
    """Objects in one bucket (optionally under a key prefix) of an S3-compatible service.

    Metadata travels as ``x-amz-meta-*`` headers; ``stat`` reports it lower-cased without the
    prefix, exactly like ``LocalBlobStore``. Streams of unknown length go up in
    ``PART_SIZE`` parts, so memory stays bounded for any document size.

    Parameters:
        endpoint: ``host:port`` or a URL (``https://`` implies ``secure``).
        access_key, secret_key: credentials; both ``None`` for anonymous access.
        bucket: created when missing.
        secure: use HTTPS.
        region: the bucket's region; ``None`` lets the SDK discover it.
        prefix: key prefix inside the bucket (``s3://bucket/prefix``).

    Raises:
        ConfigError: the endpoint or prefix is malformed.
        StorageAuthError: the service rejects the credentials (here and from every method).
        StorageError: the service cannot be reached or refuses to create the bucket.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
        prefix: str = "",
    ) -> None:
        self.endpoint, secure = _split_endpoint(endpoint, secure)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            try:
                validate_key(self.prefix)
            except StorageError as exc:
                raise ConfigError(f"invalid key prefix in s3://{bucket}/{prefix}: {exc}") from exc
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        try:
            self._client = Minio(
                self.endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region,
                http_client=http_client(),
            )
        except ValueError as exc:
            raise ConfigError(f"invalid S3 settings for endpoint {self.endpoint}: {exc}") from exc
        self._ensure_bucket(region)

    def __repr__(self) -> str:
        return f"S3BlobStore({self.url!r} at {self.endpoint!r})"

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        length: int | None = None,
        content_type: str = "application/json",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        name = self._name(key)
        headers: DictType = dict(normalize_metadata(metadata))
        if isinstance(data, bytes):
            stream: BinaryIO = io.BytesIO(data)
            size = len(data) if length is None else length
        else:
            stream, size = data, (-1 if length is None else length)
        with self._errors("upload", key):
            self._client.put_object(
                self.bucket,
                name,
                stream,
                size,
                content_type=content_type,
                metadata=headers,
                part_size=PART_SIZE,
            )

    def get(self, key: str) -> bytes:
        return b"".join(self.open(key))

    def open(self, key: str) -> Iterator[bytes]:
        name = self._name(key)
        with self._errors("download", key):
            response = self._client.get_object(self.bucket, name)
        return self._chunks(key, response)

    def stat(self, key: str) -> ObjectInfo | None:
        name = self._name(key)
        try:
            with self._errors("stat", key):
                found = self._client.stat_object(self.bucket, name)
        except ObjectMissing:
            return None
        return ObjectInfo(
            key=key,
            size=found.size or 0,
            last_modified=found.last_modified or datetime.now(UTC),
            metadata=_user_metadata(found.metadata),
            content_type=found.content_type,
        )

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            with self._errors("delete", key):
                self._client.remove_object(self.bucket, name)
        except ObjectMissing:
            return

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield key, size and modification time; S3 listings carry no metadata, use ``stat``."""
        validate_prefix(prefix)
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._errors("list", prefix):
            for found in self._client.list_objects(self.bucket, prefix=full_prefix, recursive=True):
                yield ObjectInfo(
                    key=found.object_name[strip:],
                    size=found.size or 0,
                    last_modified=found.last_modified or datetime.now(UTC),
                )

    def ping(self) -> None:
        with self._errors("health check", None):
            exists = self._client.bucket_exists(self.bucket)
        if not exists:
            raise StorageError(f"bucket {self.bucket!r} does not exist at {self.endpoint}")

    def _name(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _ensure_bucket(self, region: str | None) -> None:
        with self._errors("bucket creation", None):
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket, location=region)
            except S3Error as exc:
                # Another process created it between our check and our request.
                if exc.code != "BucketAlreadyOwnedByYou":
                    raise

    def _chunks(self, key: str, response: Any) -> Iterator[bytes]:
        try:
            with self._errors("download", key):
                yield from response.stream(CHUNK_SIZE)
        finally:
            response.close()
            response.release_conn()

    @contextmanager
    def _errors(self, action: str, key: str | None) -> Iterator[None]:
        """Translate SDK and transport errors into the product's error tree, naming key and endpoint."""
        where = f"bucket {self.bucket!r} at {self.endpoint}"
        subject = f"S3 {action} of {key!r} in {where}" if key is not None else f"S3 {action} of {where}"
        try:
            yield
        except S3Error as exc:
            if exc.code in _MISSING_CODES and key is not None:
                raise ObjectMissing(f"blob {key!r} does not exist in {where}") from exc
            if exc.code in _AUTH_CODES:
                raise StorageAuthError(
                    f"{subject} failed: authentication rejected ({exc.code}): check the S3 access key and"
                    " secret key (PIPELINE_S3_ACCESS_KEY, PIPELINE_S3_SECRET_KEY)"
                ) from exc
            raise StorageError(f"{subject} failed: {exc.code}: {exc.message}") from exc
        except (MinioException, HTTPError, OSError) as exc:
            raise StorageError(f"{subject} failed: {exc}") from exc
        except ValueError as exc:
            # minio validates names and arguments with ValueError before sending anything.
            raise InvalidKey(f"{subject} rejected: {exc}") from exc


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """Accept ``host:port`` or ``http(s)://host:port``; the URL scheme wins over ``secure``."""
    if "://" not in endpoint:
        host = endpoint.strip().rstrip("/")
    else:
        parts = urlsplit(endpoint)
        if parts.scheme not in {"http", "https"} or parts.path.strip("/") or parts.query:
            raise ConfigError(f"invalid S3 endpoint {endpoint!r}: use host:port or http(s)://host:port")
        host, secure = parts.netloc, parts.scheme == "https"
    if not host or "/" in host:
        raise ConfigError(f"invalid S3 endpoint {endpoint!r}: use host:port or http(s)://host:port")
    return host, secure


def _user_metadata(headers: Mapping[str, str] | None) -> dict[str, str]:
    return {
        name.lower()[len(_METADATA_HEADER) :]: value
        for name, value in (headers or {}).items()
        if name.lower().startswith(_METADATA_HEADER)
    }
