"""Inference: a model version's network, rebuilt and loaded, run on preprocessed images.

The one place that turns a registry version into a working network and runs it: scoring, the
champion's validation scores during training, Grad-CAM explanations and bundle export all go
through here. A version is rebuilt from the network config stored with it
(``ModelVersion.config["network"]``), so it keeps working after the task's declared network
changes; the network is built by :meth:`radflow.learning.tasks.NetworkSpec.build`, the one way.

A version runs in one of its runtime variants (radflow.db.ModelVariant): a :class:`Runner`
scores preprocessed images the same way whatever runs underneath, PyTorch on the version's
weights (:class:`TorchRunner`) or ONNX Runtime on an exported file (:class:`OnnxRunner`, fp32
or int8; radflow.learning.compression makes them). :func:`load_runner` picks the one a variant
names; radflow.learning.device picks where it runs (CUDA, TensorRT or the CPU).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import torch
from scipy.special import expit
from torch import nn

from radflow.db import ModelVariant, ModelVersion, VariantRuntime
from radflow.learning.device import autocast, onnx_providers
from radflow.learning.tasks import NetworkSpec, get_task
from radflow.store import ObjectStore

INPUT_NAME = "image"
OUTPUT_NAME = "logit"
"""Names of the exported ONNX graph's input and output."""


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


def input_shape(version: ModelVersion) -> tuple[int, ...]:
    """The shape of one preprocessed image the version's network takes: (channels, *spatial)."""
    spatial = version.config.get("spatial_size") or get_task(version.task).spatial_size
    return (1, *(int(n) for n in spatial))


class Runner(Protocol):
    """A version's network in one runtime, scoring preprocessed images batch by batch."""

    @property
    def runtime(self) -> VariantRuntime: ...

    def predict(self, images: torch.Tensor, batch_size: int) -> np.ndarray:
        """Probabilities of the positive class for an (N, C, ...) stack of images."""
        ...


class TorchRunner:
    """The version's own weights in PyTorch (fp32; mixed precision on CUDA)."""

    runtime = VariantRuntime.TORCH_FP32

    def __init__(self, network: nn.Module, device: torch.device) -> None:
        self.network = network
        self.device = device

    def predict(self, images: torch.Tensor, batch_size: int) -> np.ndarray:
        return predict(self.network, images, self.device, batch_size)


class OnnxRunner:
    """An exported ONNX model (fp32 or int8) in ONNX Runtime.

    A batch runs as one call that releases the GIL for all of it (PyTorch eager takes the GIL
    back between layers), so the scoring's database thread works beside it undisturbed.
    """

    def __init__(
        self,
        model: bytes,
        runtime: VariantRuntime,
        device: torch.device,
        threads: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.session = onnx_session(model, device, threads)

    def predict(self, images: torch.Tensor, batch_size: int) -> np.ndarray:
        array = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        logits = [
            self.session.run(None, {INPUT_NAME: array[start : start + batch_size]})[0]
            for start in range(0, len(array), batch_size)
        ]
        if not logits:
            return np.zeros(0, dtype=np.float32)
        return np.asarray(expit(np.concatenate(logits).reshape(len(array), -1)[:, 0]))


def onnx_session(model: bytes, device: torch.device, threads: int | None) -> ort.InferenceSession:
    """An ONNX Runtime session for ``model`` on ``device`` with all graph optimisations.

    ``threads``: intra-op threads (None: ONNX Runtime's default, one per core). Idle pool
    threads sleep instead of spinning: spinning would take the core the scoring's database
    thread runs on.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=onnx_providers(device))


def load_runner(
    store: ObjectStore,
    version: ModelVersion,
    variant: ModelVariant | None,
    device: torch.device,
    threads: int | None = None,
) -> Runner:
    """The runner of ``variant`` of ``version`` (None: the version's PyTorch weights)."""
    if variant is None or variant.runtime == VariantRuntime.TORCH_FP32:
        return TorchRunner(load_network(store, version, device), device)
    return OnnxRunner(store.get_bytes(variant.object_key), variant.runtime, device, threads)
