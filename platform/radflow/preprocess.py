"""Preprocessing: stored DICOM -> model-ready tensors, with the task's MONAI transforms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from radflow.dicom.pixels import to_array
from radflow.store import ObjectStore
from radflow.tasks import Task


def load_image(store: ObjectStore, object_key: str) -> np.ndarray:
    """The image of a 2D task: one frame (the middle one of a multi-frame instance)."""
    arr = to_array(store.get_bytes(object_key))
    return arr[arr.shape[0] // 2] if arr.ndim == 3 else arr


def preprocess(task: Task, image: np.ndarray) -> torch.Tensor:
    """One image through the task's deterministic transforms: (C, *spatial_size) float32."""
    out = task.preprocessing()(image)
    return torch.as_tensor(np.asarray(out), dtype=torch.float32)


def load_batch(task: Task, store: ObjectStore, object_keys: Sequence[str]) -> torch.Tensor:
    """Preprocessed images stacked into an (N, C, ...) batch."""
    transform = task.preprocessing()
    return torch.stack(
        [
            torch.as_tensor(np.asarray(transform(load_image(store, key))), dtype=torch.float32)
            for key in object_keys
        ]
    )
