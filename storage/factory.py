"""Open the blob store a URL names: ``file:///abs/dir``, ``file://./rel/dir`` or ``s3://bucket[/prefix]``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from errors import ConfigError
from storage.base import BlobStore
from storage.local import LocalBlobStore
from storage.s3 import S3BlobStore


def open_store(
    url: str,
    *,
    endpoint: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    secure: bool = False,
    region: str | None = None,
) -> BlobStore:
    """Return the store for ``url``.

    Parameters:
        url: ``file:///abs/dir``, ``file://./rel/dir`` (relative to the current directory),
            or ``s3://bucket`` / ``s3://bucket/prefix``.
        endpoint, access_key, secret_key, secure, region: the S3 service; ``endpoint`` is
            required for ``s3://`` and ignored for ``file://``.

    Raises:
        ConfigError: the URL is not one of the forms above, or ``s3://`` lacks an endpoint.
        StorageError: the store cannot be created or reached (bucket creation, directory).
    """
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ConfigError(f"unsupported blob store URL {url!r}: no query or fragment allowed")
    if parts.scheme == "file":
        return LocalBlobStore(_local_root(url, parts.netloc, unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"unsupported blob store URL {url!r}: s3:// needs a bucket, e.g. s3://pipeline")
        if not endpoint:
            raise ConfigError(f"blob store URL {url!r} needs an S3 endpoint (PIPELINE_S3_ENDPOINT)")
        return S3BlobStore(
            endpoint=endpoint,
            access_key=access_key,
            secret_key=secret_key,
            bucket=parts.netloc,
            secure=secure,
            region=region,
            prefix=unquote(parts.path),
        )
    raise ConfigError(f"unsupported blob store URL {url!r}: use file:///DIR, file://./DIR or s3://BUCKET")


def _local_root(url: str, netloc: str, path: str) -> Path:
    if netloc in ("", "localhost"):
        if not path:
            raise ConfigError(f"unsupported blob store URL {url!r}: file:// needs a directory")
        return Path(path)
    if netloc in (".", ".."):
        # file://./blobs puts "." in the authority; join it back to make a cwd-relative path.
        return Path.cwd() / netloc / path.lstrip("/")
    raise ConfigError(
        f"unsupported blob store URL {url!r}: use file:///absolute/dir or file://./relative/dir"
    )
