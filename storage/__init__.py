"""Blob stores (S3/MinIO through the minio SDK, a local directory), checksums, the read cache."""

from storage.base import BlobStore, ObjectInfo
from storage.checksum import sha256_hex

__all__ = ["BlobStore", "ObjectInfo", "open_store", "sha256_hex"]


def open_store(
    url: str,
    *,
    endpoint: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    secure: bool = False,
    region: str | None = None,
) -> BlobStore:
    """Open the store named by ``url`` (``file:///DIR`` or ``s3://BUCKET``); see ``storage.factory``."""
    # Imported here so that ``import storage`` stays cheap and does not load the S3 SDK.
    from storage.factory import open_store as _open

    return _open(
        url, endpoint=endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region
    )
