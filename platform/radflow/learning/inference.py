"""Inference: a model version's network, rebuilt and loaded, run on preprocessed images.

The one place that turns a registry version into a working network and runs it: scoring, the
champion's validation scores during training, Grad-CAM explanations and bundle export all go
through here. A version is rebuilt from the network config stored with it
(``ModelVersion.config["network"]``), so it keeps working after the task's declared network
changes; the network is built by :meth:`radflow.learning.tasks.NetworkSpec.build`, the one way.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from radflow.db import ModelVersion
from radflow.learning.device import autocast
from radflow.learning.tasks import NetworkSpec, get_task
from radflow.store import ObjectStore


def network_spec(version: ModelVersion) -> NetworkSpec:
    """The network a version was trained as (the task's declared one if it stored none)."""
    stored = version.config.get("network")
    cam_layer = version.config.get("cam_layer")
    if isinstance(stored, Mapping):
        return NetworkSpec.from_config(stored, cam_layer)
    return get_task(version.task).network


def load_weights(store: ObjectStore, version: ModelVersion) -> dict[str, Any]:
    """The version's state dict, on the CPU."""
    state: dict[str, Any] = torch.load(
        io.BytesIO(store.get_bytes(version.weights_key)), map_location="cpu", weights_only=True
    )
    return state


def load_network(store: ObjectStore, version: ModelVersion, device: torch.device) -> nn.Module:
    """The version's network with its weights, in eval mode on ``device``."""
    network = network_spec(version).build()
    network.load_state_dict(load_weights(store, version))
    network.to(device).eval()
    return network


@torch.no_grad()
def predict(
    network: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int
) -> np.ndarray:
    """Probabilities of the positive class for a stack of preprocessed images."""
    network.eval()
    out = []
    for batch in torch.split(images, batch_size):
        with autocast(device):
            out.append(torch.sigmoid(network(batch.to(device)).float().squeeze(1)).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)
