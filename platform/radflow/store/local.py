"""Object store on a local directory (the embedded default)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from radflow.store.base import ObjectNotFound
from radflow.store.durable import fsync_path, private_dir

# Objects being written; never listed.
TEMP_PREFIX = ".tmp-"


class LocalStore:
    """Keys map to files under ``root``; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        private_dir(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"object key {key!r} escapes the store root")
        return path

    def put_file(
        self, key: str, path: Path, content_type: str = "application/octet-stream"
    ) -> None:
        self.put_files([(key, path)], content_type)

    def put_files(
        self,
        items: Sequence[tuple[str, Path]],
        content_type: str = "application/octet-stream",
        *,
        immutable: bool = False,
    ) -> None:
        """Copy (or, for ``immutable`` sources on this filesystem, hard-link) each file in.

        Every object goes to a temporary name, then all are fsynced, renamed into place and
        their folders fsynced: one batch costs about one journal commit, not one per file. A
        hard link shares the source's bytes, so the store never sees a change made to the source
        later: only callers that never change their files may ask for it.
        """
        staged: list[tuple[Path, Path]] = []
        try:
            for key, source in items:
                target = self._path(key)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
                staged.append((tmp, target))  # first: a copy cut short is cleaned up too
                if not (immutable and _hard_link(source, tmp)):
                    shutil.copyfile(source, tmp)
            for tmp, _ in staged:
                fsync_path(tmp)
            for tmp, target in staged:
                os.replace(tmp, target)
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for folder in {target.parent for _, target in staged}:
            fsync_path(folder)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        durable: bool = True,
    ) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as dst:
                dst.write(data)
                dst.flush()
                if durable:  # an fsync costs milliseconds; re-creatable objects skip it
                    os.fsync(dst.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if durable:
            fsync_path(target.parent)  # the new name, too

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        keys = (
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and not p.name.startswith(TEMP_PREFIX)
        )
        yield from sorted(k for k in keys if k.startswith(prefix))


def _hard_link(source: Path, link: Path) -> bool:
    """Link ``source`` at ``link``; False where the filesystem cannot (another device, no links)."""
    try:
        os.link(source, link)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True
