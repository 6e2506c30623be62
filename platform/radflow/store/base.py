"""The object-store interface every backend implements."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol


class ObjectNotFound(KeyError):
    """The key is not in the store."""


class ObjectStore(Protocol):
    """Flat keys ('originals/1.2.3/4.5.6/7.8.9.dcm') to immutable bytes."""

    def put_file(
        self, key: str, path: Path, content_type: str = "application/octet-stream"
    ) -> None:
        """Store the file at ``path`` under ``key``, replacing what was there."""

    def put_files(
        self,
        items: Sequence[tuple[str, Path]],
        content_type: str = "application/octet-stream",
        *,
        immutable: bool = False,
    ) -> None:
        """Store each ``(key, path)``; every object is durable when this returns.

        ``immutable=True``: the caller never changes these files again (the receiver's spool, a
        temporary file it only deletes), so a backend may keep their bytes without copying them
        (a local store hard-links them).
        """

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        durable: bool = True,
    ) -> None:
        """Store ``data`` under ``key``. ``durable=False``: a derived object that can be made
        again (a heat map), so a backend may skip forcing it to disk before returning."""

    def get_bytes(self, key: str) -> bytes:
        """Return the object's bytes; raise ObjectNotFound if there is none."""

    def open(self, key: str) -> BinaryIO:
        """A readable stream of the object; the caller closes it."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key that starts with ``prefix``, in lexical order."""
