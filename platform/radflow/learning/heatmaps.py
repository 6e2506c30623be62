"""The stored forms of a volume's maps (heat maps, label maps), readable without torch (the
dashboard reads them).

``gradcam.npz``: ``heat``, 8-bit (slices, rows, columns) at the model's input grid, 0 = no
contribution, 255 = the strongest evidence; and ``affine``, where those voxels lie in the patient
(4x4, voxel index to LPS mm: the preprocessed MetaTensor's, radflow.learning.cache).
A label map (a segmentation) is stored the same way: ``labels``, uint8 (0 background, 1-255 a
label each), and ``affine``.
"""

from __future__ import annotations

import io

import numpy as np


def heatmap_volume(heat: np.ndarray, affine: np.ndarray | None) -> bytes:
    """A 3D map in [0, 1] and its affine (None: unknown, identity) as a compressed npz."""
    if heat.ndim != 3:
        raise ValueError(f"a heat map volume needs a 3D map, got shape {heat.shape}")
    pixels = np.clip(np.round(heat * 255.0), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    np.savez_compressed(out, heat=pixels, affine=np.eye(4) if affine is None else affine)
    return out.getvalue()


def read_heatmap_volume(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A stored heat map volume back: floats in [0, 1] (slices, rows, columns), and its affine.

    ValueError if ``data`` is not one (not an npz, or without those arrays)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            heat, affine = stored["heat"], stored["affine"]
    except (OSError, KeyError, EOFError) as exc:
        raise ValueError(f"not a heat map volume: {exc}") from exc
    if heat.ndim != 3 or np.shape(affine) != (4, 4):
        raise ValueError(f"not a heat map volume: heat {heat.shape}, affine {np.shape(affine)}")
    return heat.astype(np.float32) / 255.0, np.asarray(affine, np.float64)


def label_volume(labels: np.ndarray, affine: np.ndarray | None) -> bytes:
    """A 3D label map (0 background, 1-255 one label each) and its affine as a compressed npz:
    the stored form of a volume's segmentation, drawn over the series by the viewer."""
    if labels.ndim != 3:
        raise ValueError(f"a label map volume needs a 3D map, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("label values must be 0 (background) to 255")
    out = io.BytesIO()
    np.savez_compressed(
        out, labels=labels.astype(np.uint8), affine=np.eye(4) if affine is None else affine
    )
    return out.getvalue()


def read_label_volume(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A stored label map volume back: uint8 (slices, rows, columns) and its affine.

    ValueError if ``data`` is not one."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            labels, affine = stored["labels"], stored["affine"]
    except (OSError, KeyError, EOFError, ValueError) as exc:
        raise ValueError(f"not a label map volume: {exc}") from exc
    if labels.ndim != 3 or np.shape(affine) != (4, 4):
        raise ValueError(
            f"not a label map volume: labels {labels.shape}, affine {np.shape(affine)}"
        )
    return labels.astype(np.uint8), np.asarray(affine, np.float64)
