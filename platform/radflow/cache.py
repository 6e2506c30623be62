"""A local cache of preprocessed tensors, keyed by image content and transform digest.

Decoding DICOM and resizing dominates data loading; a retrain sees mostly the same images.
A tensor is stored under ``<cache_dir>/preprocessed/<task>/<transform digest>/<sha256>.npy``:
the instance's content digest (``Instance.sha256``) and the task's preprocessing digest together
say exactly what the tensor is, so a hit is always valid, a changed transform misses, and
nothing needs invalidating. Only de-identified pixels after preprocessing are kept here, never
DICOM headers.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from radflow.preprocess import load_image, plain_tensors
from radflow.store import ObjectStore
from radflow.tasks import Task

logger = logging.getLogger(__name__)


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
    sha256: str
    object_key: str


class PreprocessCache:
    """Preprocessed tensors of one task's images."""

    def __init__(self, root: Path, task: Task) -> None:
        self.task = task
        self.dir = root / "preprocessed" / task.name / task.preprocessing_digest()

    def _path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.npy"

    def load(
        self, store: ObjectStore, images: Sequence[CachedImage]
    ) -> tuple[torch.Tensor, CacheStats]:
        """An (N, C, ...) batch of ``images``, decoding only those not cached yet."""
        with plain_tensors():
            return self._load(store, images)

    def _load(
        self, store: ObjectStore, images: Sequence[CachedImage]
    ) -> tuple[torch.Tensor, CacheStats]:
        started = time.perf_counter()
        stats = CacheStats()
        transform = self.task.preprocessing()
        arrays = []
        for image in images:
            path = self._path(image.sha256)
            try:
                arrays.append(np.load(path))
                stats.hits += 1
                continue
            except FileNotFoundError:
                pass
            array = np.asarray(transform(load_image(store, image.object_key)), dtype=np.float32)
            self._save(path, array)
            arrays.append(array)
            stats.misses += 1
        stats.seconds = time.perf_counter() - started
        batch = (
            torch.from_numpy(np.stack(arrays))
            if arrays
            else torch.zeros((0, 1, *self.task.spatial_size))
        )
        return batch, stats

    def _save(self, path: Path, array: np.ndarray) -> None:
        # Write then rename: a crash or a concurrent trainer never leaves a half-written tensor.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            np.save(out, array)
        os.replace(tmp, path)
