"""Where tensors run. The only place that decides between CUDA and CPU."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)


def select_device(preferred: str | None = None) -> torch.device:
    """CUDA when present (or when asked for), else the CPU."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
