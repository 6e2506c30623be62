"""Explainability: Grad-CAM heat maps for classification predictions (monai.visualize).

One forward and one backward pass per batch give both the scores and the maps: MONAI's hooks
keep the class logit of the forward pass they run, so scoring does not run the network twice.

The stored map is an 8-bit grey-scale PNG at the model's input size (``task.spatial_size``),
0 = no contribution, 255 = the strongest evidence for the positive class in that image. The
model sees the whole image resized (no crop), so the map overlays the original image by
stretching it to the image's rows and columns.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from monai.visualize import GradCAM
from PIL import Image
from torch import nn

from radflow.device import autocast

GRADCAM_NAME = "gradcam.png"


class Explainer:
    """Scores and Grad-CAM maps of a binary classifier, batch by batch."""

    def __init__(self, network: nn.Module, cam_layer: str) -> None:
        self.network = network
        self.cam = GradCAM(nn_module=network, target_layers=cam_layer)

    def __call__(self, images: torch.Tensor, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """Positive-class probabilities (N,) and heat maps (N, *spatial) in [0, 1]."""
        x = images.to(device)
        with torch.enable_grad(), autocast(device):
            maps = self.cam(x, class_idx=0)
        logits = self.cam.nn_module.score.detach().float().reshape(-1)
        self.network.zero_grad(set_to_none=True)
        scores = torch.sigmoid(logits).cpu().numpy()
        heat = maps.detach().float().cpu().numpy()[:, 0]
        return scores, np.nan_to_num(heat, nan=0.0)


def heatmap_png(heat: np.ndarray) -> bytes:
    """A 2D map in [0, 1] as an 8-bit grey-scale PNG."""
    if heat.ndim != 2:
        raise ValueError(f"a heat map PNG needs a 2D map, got shape {heat.shape}")
    pixels = np.clip(np.round(heat * 255.0), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def read_heatmap(data: bytes) -> np.ndarray:
    """A stored heat map back as floats in [0, 1] (for overlays and tests)."""
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255.0
