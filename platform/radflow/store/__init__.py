"""Object store: originals, derived files and models, on a local folder or S3."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from radflow.settings import Settings
from radflow.store import keys
from radflow.store.base import ObjectNotFound, ObjectStore
from radflow.store.local import LocalStore
from radflow.store.s3 import S3Store

__all__ = ["LocalStore", "ObjectNotFound", "ObjectStore", "S3Store", "keys", "open_store"]


def open_store(settings: Settings) -> ObjectStore:
    """The store named by ``settings.store_url``: ``s3://bucket`` or a local folder."""
    url = settings.store_url
    if url.startswith("s3://"):
        from minio import Minio

        bucket = urlparse(url).netloc
        if not bucket:
            raise ValueError(f"RADFLOW_STORE_URL={url!r} names no bucket; use s3://<bucket>")
        client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key or None,
            secret_key=settings.s3_secret_key.get_secret_value() or None,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
        return S3Store(client, bucket)
    if "://" in url and not url.startswith("file://"):
        raise ValueError(
            f"RADFLOW_STORE_URL={url!r}: use a folder path, file://PATH or s3://BUCKET"
        )
    return LocalStore(Path(url.removeprefix("file://")))
