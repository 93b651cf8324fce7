"""Blob stores (S3/MinIO through the minio SDK, a local directory), checksums, the read cache.

``storage.factory.open_store`` opens the store a URL names; it is not imported here, so that
``import storage`` stays cheap and does not load the S3 SDK.
"""

from storage.base import BlobStore, ObjectInfo
from storage.checksum import sha256_hex

__all__ = ["BlobStore", "ObjectInfo", "sha256_hex"]
