"""The stored form of a volume's heat map, readable without torch (the dashboard reads it).

``gradcam.npz``: ``heat``, 8-bit (slices, rows, columns) at the model's input grid, 0 = no
contribution, 255 = the strongest evidence; and ``affine``, where those voxels lie in the patient
(4x4, voxel index to LPS mm: the preprocessed MetaTensor's, radflow.learning.cache).
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
