"""Blob stores (S3/MinIO through the minio SDK, a local directory), checksums, the read cache."""

from storage.base import BlobStore, ObjectInfo
from storage.checksum import sha256_hex

__all__ = ["BlobStore", "ObjectInfo", "open_store", "sha256_hex"]


def open_store(url: str, **s3_options: object) -> BlobStore:
    """Open the store named by ``url`` (``file:///DIR`` or ``s3://BUCKET``); see ``storage.factory``."""
    from storage.factory import open_store as _open

    return _open(url, **s3_options)
