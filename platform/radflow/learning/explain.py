"""Explainability: Grad-CAM heat maps for classification predictions (monai.visualize).

One forward and one backward pass per batch give both the scores and the maps: MONAI's hooks
keep the class logit of the forward pass they run, so scoring does not run the network twice.

The stored map of a 2D task is an 8-bit grey-scale PNG at the model's input size
(``task.spatial_size``), 0 = no contribution, 255 = the strongest evidence for the positive
class in that image. The model sees the whole image resized (no crop), so the map overlays the
original image by stretching it to the image's rows and columns.

A volume task's map is a volume (``gradcam.npz``, radflow.learning.heatmaps) with the affine
that places it on the series whatever the preprocessing turned or resized
(radflow.services.study_view resamples it onto the shown slice).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from monai.visualize import GradCAM
from PIL import Image
from torch import nn

from radflow.learning.device import autocast
from radflow.learning.heatmaps import heatmap_volume
from radflow.store import ObjectStore

GRADCAM_NAME = "gradcam.png"
GRADCAM_VOLUME_NAME = "gradcam.npz"  # the suffix radflow.services.study_view knows volumes by
STORE_THREADS = 4
"""Threads writing heat maps: on S3 each PUT is a round trip, which threads overlap."""


class Explainer:
    """Scores and Grad-CAM maps of a binary classifier, batch by batch.

    Only the CAM layer's parameters keep ``requires_grad``: the gradient Grad-CAM needs (of the
    logit with respect to that layer's activations) then flows back to that layer and stops,
    instead of through every earlier layer's weights, which cost most of the backward pass and
    which nothing uses. Do not train ``network`` after wrapping it.

    A CAM layer without weights of its own (a reshaping layer, e.g. the per-slice encoder's maps
    stacked as a volume in radflow.learning.networks.SliceSequenceClassifier) gets its gradient
    from the input instead: the input then requires it, and the backward pass runs through the
    earlier layers' activations (still not their weights).
    """

    def __init__(self, network: nn.Module, cam_layer: str) -> None:
        self.network = network
        layer = dict(network.named_modules()).get(cam_layer)
        if layer is None:
            raise ValueError(f"the network has no layer {cam_layer!r} for Grad-CAM")
        network.requires_grad_(False)
        layer.requires_grad_(True)
        self._input_grad = next(layer.parameters(), None) is None
        # MONAI's default post-processing maps (min, max) to (1, 0), flipping the map, one
        # image at a time; this maps each map to [0, 1] with the strongest evidence at 1.
        self.cam = GradCAM(nn_module=network, target_layers=cam_layer, postprocessing=_unit_range)

    def __call__(self, images: torch.Tensor, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """Positive-class probabilities (N,) and heat maps (N, *spatial) in [0, 1]."""
        x = images.to(device)
        if self._input_grad:
            x = x.detach().requires_grad_(True)
        with torch.enable_grad(), autocast(device), warnings.catch_warnings():
            # The CAM layer's input needs no gradient, so PyTorch notes that the layer's
            # backward hook sees only output gradients: exactly what Grad-CAM reads.
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            maps = self.cam(x, class_idx=0)
        logits = self.cam.nn_module.score.detach().float().reshape(-1)
        self.network.zero_grad(set_to_none=True)
        scores = torch.sigmoid(logits).cpu().numpy()
        heat = maps.detach().float().cpu().numpy()[:, 0]
        return scores, np.nan_to_num(heat, nan=0.0)


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Each map of a batch scaled to [0, 1] (a constant map: all 0), in one vectorised step."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, *[1] * (maps.dim() - 1))
    span = flat.max(dim=1).values.view(-1, *[1] * (maps.dim() - 1)) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


def heatmap_png(heat: np.ndarray) -> bytes:
    """A 2D map in [0, 1] as an 8-bit grey-scale PNG."""
    if heat.ndim != 2:
        raise ValueError(f"a heat map PNG needs a 2D map, got shape {heat.shape}")
    pixels = np.clip(np.round(heat * 255.0), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def save_heatmaps(
    store: ObjectStore,
    object_keys: Sequence[str],
    maps: np.ndarray,
    affines: Sequence[np.ndarray | None] | None = None,
) -> None:
    """Each map under its key: a PNG for a 2D map, an npz with its affine for a volume (the
    ``affines``, in the order of ``maps``). Not fsynced: a heat map is derived, made again by
    scoring the study again, and a forced write per file would cost more than the network."""

    def put(key: str, heat: np.ndarray, affine: np.ndarray | None) -> None:
        if heat.ndim == 2:
            store.put_bytes(key, heatmap_png(heat), content_type="image/png", durable=False)
        else:
            data = heatmap_volume(heat, affine)
            store.put_bytes(key, data, content_type="application/octet-stream", durable=False)

    if len(object_keys) != len(maps):
        raise ValueError(f"{len(object_keys)} keys for {len(maps)} heat maps")
    placed = list(affines) if affines is not None else [None] * len(maps)
    with ThreadPoolExecutor(STORE_THREADS) as pool:
        list(pool.map(put, object_keys, maps, placed))  # list(): re-raises the first failed write


def read_heatmap(data: bytes) -> np.ndarray:
    """A stored heat map back as floats in [0, 1] (for overlays and tests)."""
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255.0
