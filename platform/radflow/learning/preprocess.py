"""Preprocessing: stored DICOM -> model-ready tensors, with the task's MONAI transforms."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose

from radflow.dicom.pixels import to_image
from radflow.learning.tasks import Task
from radflow.store import ObjectStore


def load_image(store: ObjectStore, object_key: str) -> np.ndarray:
    """The image of a 2D task: one frame (the middle one of a multi-frame instance), (rows,
    cols) grey-scale or (rows, cols, 3) colour."""
    return to_image(store.get_bytes(object_key))


def preprocess(task: Task, image: np.ndarray, transform: Compose | None = None) -> torch.Tensor:
    """One image through the task's deterministic transforms: (C, *spatial_size) float32.

    Pass ``transform`` (``task.preprocessing()``) when preprocessing many images: building the
    transforms once per batch instead of once per image.
    """
    out = (transform or task.preprocessing())(image)
    return torch.as_tensor(np.asarray(out), dtype=torch.float32)


@contextlib.contextmanager
def plain_tensors() -> Iterator[None]:
    """Transforms return plain tensors, not MetaTensors, inside this block.

    Deterministic preprocessing needs no inverse, so MONAI's metadata tracking is pure overhead
    there (a third of the per-image preprocessing time for small images).
    """
    before = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(before)
