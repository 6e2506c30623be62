"""Object store on MinIO or any S3 server, through the ``minio`` client."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from minio import Minio
from minio.error import S3Error

from radflow.store.base import ObjectNotFound

logger = logging.getLogger(__name__)


class S3Store:
    def __init__(self, client: Minio, bucket: str, create_bucket: bool = True) -> None:
        self.client = client
        self.bucket = bucket
        if create_bucket and not client.bucket_exists(bucket_name=bucket):
            logger.info("creating bucket %s", bucket)
            client.make_bucket(bucket_name=bucket)

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r})"

    def put_file(
        self, key: str, path: Path, content_type: str = "application/octet-stream"
    ) -> None:
        self.client.fput_object(
            bucket_name=self.bucket, object_name=key, file_path=str(path), content_type=content_type
        )

    def put_files(
        self,
        items: Sequence[tuple[str, Path]],
        content_type: str = "application/octet-stream",
        *,
        immutable: bool = False,  # every PUT copies the bytes: nothing to share
    ) -> None:
        for key, path in items:
            self.put_file(key, path, content_type)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        durable: bool = True,  # S3 acknowledges a PUT once stored: nothing to skip
    ) -> None:
        self.client.put_object(
            bucket_name=self.bucket,
            object_name=key,
            data=io.BytesIO(data),
            length=len(data),
            content_type=content_type,
        )

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def open(self, key: str) -> BinaryIO:
        try:
            response = self.client.get_object(bucket_name=self.bucket, object_name=key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(key) from None
            raise
        try:
            return io.BytesIO(response.read())
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(bucket_name=self.bucket, object_name=key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.remove_object(bucket_name=self.bucket, object_name=key)

    def list(self, prefix: str = "") -> Iterator[str]:
        objects = self.client.list_objects(bucket_name=self.bucket, prefix=prefix, recursive=True)
        yield from sorted(o.object_name for o in objects if o.object_name is not None)
