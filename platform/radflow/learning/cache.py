"""A local cache of preprocessed tensors, keyed by image content and transform digest.

Decoding DICOM and resizing dominates data loading; a retrain sees mostly the same images, and
the studies a radiologist labels were scored (and so preprocessed) before. A tensor is stored
under ``<cache_dir>/preprocessed/<task>/<transform digest>/<sha256>.npy``: the content digest of
its input (``Instance.sha256`` for an image; for a series, the digest of its instances' digests
in stack order, radflow.dicom.geometry.SeriesPlan.digest) and the task's preprocessing digest
together say exactly what the tensor is, so a hit is always valid, a changed transform misses,
and nothing needs invalidating. Only de-identified pixels after preprocessing are kept here,
never DICOM headers. Training and scoring both read and fill it.

A volume's tensor has a sidecar ``<sha256>.affine.npy``: where its voxels lie in the patient
after preprocessing (from the MONAI MetaTensor), which places its Grad-CAM map on the series.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from pydicom.errors import InvalidDicomError

from radflow.dicom.geometry import SeriesPlan
from radflow.dicom.volume import load_volume
from radflow.learning.preprocess import load_image, plain_tensors
from radflow.learning.tasks import Task
from radflow.store import ObjectNotFound, ObjectStore

logger = logging.getLogger(__name__)

DECODE_ERRORS = (
    InvalidDicomError,
    ValueError,
    RuntimeError,
    OSError,
    NotImplementedError,
    ObjectNotFound,
)
"""What an unreadable or missing image raises while it is fetched, decoded and preprocessed."""

_AFFINE = ".affine.npy"

DECODE_THREADS = 4
"""Threads fetching and decoding cache misses. They mostly wait on the object store (an S3
round trip per image) and on file reads, which release the GIL; more would only contend."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    seconds: float = 0.0

    def add(self, other: CacheStats) -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.seconds += other.seconds


@dataclass(frozen=True)
class CachedImage:
    """One stored image: the input of a 2D task."""

    sha256: str
    object_key: str

    def load(self, store: ObjectStore) -> np.ndarray:
        return load_image(store, self.object_key)


@dataclass(frozen=True)
class CachedSeries:
    """A series planned as one stack: the input of a volume task, loaded with its affine."""

    plan: SeriesPlan

    @property
    def sha256(self) -> str:
        return self.plan.digest

    def load(self, store: ObjectStore) -> torch.Tensor:
        tensor: torch.Tensor = load_volume(store, self.plan).meta_tensor()
        return tensor


CacheItem = CachedImage | CachedSeries


def cache_item(sha256: str, object_key: str, plan: SeriesPlan | None) -> CacheItem:
    """A routed study's input: its series (``plan``, a series task) or its one image."""
    return CachedSeries(plan) if plan is not None else CachedImage(sha256, object_key)


class PreprocessCache:
    """Preprocessed tensors of one task's images; with ``root=None``, decoded every time."""

    def __init__(self, root: Path | None, task: Task) -> None:
        self.task = task
        self.dir = root / "preprocessed" / task.name / task.preprocessing_digest() if root else None
        self._root = str(self.dir)
        self._layout: tuple[bytes, np.dtype[Any], tuple[int, ...]] | None = None
        self._affines: dict[str, np.ndarray] = {}  # made in this process, by digest

    def _path(self, sha256: str, suffix: str = ".npy") -> Path | None:
        return self.dir / sha256[:2] / f"{sha256}{suffix}" if self.dir else None

    def affine(self, image: CacheItem) -> np.ndarray | None:
        """Where a preprocessed volume's voxels lie (4x4, LPS mm), None for a 2D image or an
        entry cached without one."""
        if image.sha256 in self._affines:
            return self._affines[image.sha256]
        path = self._path(image.sha256, _AFFINE)
        try:
            return np.load(path) if path is not None else None
        except (FileNotFoundError, ValueError, OSError, EOFError):
            return None

    def _read_file(self, sha256: str) -> bytes:
        """A cached tensor file's bytes (FileNotFoundError: not cached).

        With plain string paths and one os.read: ~12 µs a file, where pathlib's read_bytes
        and its path joins take ~35 µs, as much as the int8 network spends on a 32 px image.
        """
        fd = os.open(f"{self._root}/{sha256[:2]}/{sha256}.npy", os.O_RDONLY)
        try:
            # One read of the whole file; were it ever short, the tensor would not parse and
            # would be made again, like a file a crash cut short.
            return os.read(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def load(
        self, store: ObjectStore, images: Sequence[CacheItem]
    ) -> tuple[torch.Tensor, CacheStats]:
        """An (N, C, ...) batch of ``images``, decoding only those not cached yet.

        Raises the error of the first image that cannot be read (training needs them all).
        """
        arrays, stats = self.arrays(store, images)
        for array in arrays:
            if isinstance(array, Exception):
                raise array
        return self.stack([a for a in arrays if isinstance(a, np.ndarray)]), stats

    def stack(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Cached arrays as one (N, C, ...) float32 batch (an empty batch for none)."""
        if not arrays:
            return torch.zeros((0, 1, *self.task.spatial_size))
        return torch.from_numpy(np.stack(arrays))

    def arrays(
        self, store: ObjectStore, images: Sequence[CacheItem], *, threads: int = DECODE_THREADS
    ) -> tuple[list[np.ndarray | Exception], CacheStats]:
        """Each image's preprocessed array, or the error that made it unreadable, in order.

        Hits are read from the cache; misses are fetched, decoded and preprocessed on
        ``threads`` threads, then saved, so the next training or scoring reads them back. A
        volume task loads one series at a time (each fetches its slices on threads of its own):
        a CT series decoded takes hundreds of MB.
        """
        started = time.perf_counter()
        out: list[np.ndarray | Exception | None] = [self._cached(image) for image in images]
        missing = [i for i, array in enumerate(out) if array is None]
        if self.task.takes_series:
            threads = 1
        if missing:
            # A volume keeps MONAI's metadata: Orientation needs the series' affine, and the
            # preprocessed affine places the Grad-CAM map.
            with contextlib.nullcontext() if self.task.takes_series else plain_tensors():
                transform = self.task.preprocessing()
                if threads > 1 and len(missing) > 1:
                    with ThreadPoolExecutor(min(threads, len(missing))) as pool:
                        made = list(
                            pool.map(lambda i: self._make(store, images[i], transform), missing)
                        )
                else:
                    made = [self._make(store, images[i], transform) for i in missing]
            for i, array in zip(missing, made, strict=True):
                out[i] = array
        stats = CacheStats(
            hits=len(images) - len(missing),
            misses=len(missing),
            seconds=time.perf_counter() - started,
        )
        return [a for a in out if a is not None], stats

    def _cached(self, image: CacheItem) -> np.ndarray | None:
        if self.dir is None:
            return None
        try:
            array = self._read(self._read_file(image.sha256))
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError):
            # A file cut short by a crash (tensors are not fsynced): made again on this miss.
            logger.warning("preprocessing cache: rebuilding unreadable %s", image.sha256[:12])
            return None
        return array

    def _read(self, data: bytes) -> np.ndarray:
        # Every tensor of one cache folder has the same .npy header (same transforms, same
        # shape): parsed once, then the pixels are taken as they are. np.load parses every
        # header (an ast.literal_eval each): ~0.15 ms a file, a tenth of what scoring a 32 px
        # image costs in all.
        if self._layout is None or not data.startswith(self._layout[0]):
            buffer = io.BytesIO(data)
            version = np.lib.format.read_magic(buffer)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
            if fortran or dtype.hasobject:
                raise ValueError("not a tensor this cache writes")
            self._layout = (data[: buffer.tell()], dtype, shape)
        header, dtype, shape = self._layout
        return np.frombuffer(data, dtype=dtype, offset=len(header)).reshape(shape)

    def _make(
        self, store: ObjectStore, image: CacheItem, transform: Compose
    ) -> np.ndarray | Exception:
        try:
            out = transform(image.load(store))
        except DECODE_ERRORS as exc:
            return exc
        array = np.asarray(out.numpy() if isinstance(out, torch.Tensor) else out, np.float32)
        affine = out.affine.numpy() if isinstance(out, MetaTensor) else None
        path = self._path(image.sha256)
        if affine is not None:
            self._affines[image.sha256] = affine
            if path is not None:
                self._save(path.with_suffix(_AFFINE), affine)
        if path is not None:
            self._save(path, array)
        return array

    def _save(self, path: Path, array: np.ndarray) -> None:
        # Write then rename: a concurrent reader never sees a half-written tensor. No fsync:
        # the cache can always be rebuilt, and a file a crash cut short reads as a miss.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            np.save(out, array)
        os.replace(tmp, path)
