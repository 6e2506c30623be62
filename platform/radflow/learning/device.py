"""Where tensors run. The only place that decides between CUDA and CPU, for PyTorch (with mixed
precision on CUDA) and for ONNX Runtime (its execution providers: TensorRT, CUDA, CPU)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)


def select_device(preferred: str | None = None) -> torch.device:
    """CUDA when present (or when asked for), else the CPU."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


ONNX_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
"""ONNX Runtime's execution providers in order of preference on a CUDA device."""
CPU_PROVIDER = "CPUExecutionProvider"


def onnx_providers(device: torch.device, available: Sequence[str] | None = None) -> list[str]:
    """ONNX Runtime's execution providers for ``device``, best first.

    On a CUDA device: TensorRT when installed, then CUDA; the CPU provider always comes last,
    since ONNX Runtime runs there any node the others cannot. ``available`` defaults to the
    providers of the installed onnxruntime build.
    """
    if available is None:
        import onnxruntime  # here: only ONNX variants need it, not every user of the device

        available = onnxruntime.get_available_providers()
    wanted = ONNX_PROVIDERS if device.type == "cuda" else (CPU_PROVIDER,)
    chosen = [p for p in wanted if p in available and p != CPU_PROVIDER]
    return [*chosen, CPU_PROVIDER]


def autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Mixed precision on CUDA; full precision on the CPU, where fp16 is slower, not faster."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling keeps fp16 gradients from underflowing; disabled (a no-op) off CUDA."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda")


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Temporarily cap intra-op threads (None leaves PyTorch's default)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
