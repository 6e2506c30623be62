"""Networks MONAI does not ship, built from MONAI blocks: referenced by tasks as MONAI configs
(``{"_target_": "radflow.learning.networks.SliceSequenceClassifier", ...}``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from monai.networks.blocks import ResidualUnit
from torch import nn


class SliceSequenceClassifier(nn.Module):
    """A 2D CNN encoder on every slice (or frame), then a recurrent network over their order.

    The model family of the sources for image sequences: each image of a (C, T, H, W) stack is
    encoded by the same residual CNN (MONAI ResidualUnits) into a feature vector, an LSTM or GRU
    (bidirectional by default: a stack read either way is the same anatomy) reads the T vectors
    in order, and its outputs, averaged over the sequence, give ``classes`` logits.

    ``features`` holds the encoder's maps as (B, C, T, h, w): the Grad-CAM layer, whose maps are
    then a volume (T, h, w) like the input's.
    """

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 1,
        channels: Sequence[int] = (16, 32, 64),
        strides: Sequence[int] = (1, 2, 2),
        hidden: int = 64,
        rnn: Literal["lstm", "gru"] = "lstm",
        bidirectional: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"{len(channels)} channels for {len(strides)} strides")
        blocks: list[nn.Module] = []
        previous = in_channels
        for out, stride in zip(channels, strides, strict=True):
            blocks.append(
                ResidualUnit(
                    spatial_dims=2,
                    in_channels=previous,
                    out_channels=out,
                    strides=stride,
                    subunits=2,
                    norm="BATCH",
                    dropout=dropout,
                )
            )
            previous = out
        self.encoder = nn.Sequential(*blocks)
        self.features = nn.Identity()
        # Pooling as a module, not a mean: its backward hands Grad-CAM the contiguous gradient
        # MONAI's GradCAM views (a mean's backward is a broadcast, which it cannot).
        self.pool = nn.AdaptiveAvgPool3d((None, 1, 1))
        recurrent = nn.LSTM if rnn == "lstm" else nn.GRU
        self.rnn = recurrent(previous, hidden, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, steps, height, width = x.shape
        frames = x.transpose(1, 2).reshape(batch * steps, channels, height, width)
        encoded = self.encoder(frames)
        maps = encoded.reshape(batch, steps, *encoded.shape[1:]).transpose(1, 2)
        maps = self.features(maps)  # (B, C, T, h, w)
        sequence = self.pool(maps).flatten(2).transpose(1, 2)  # (B, T, C)
        outputs, _ = self.rnn(sequence)
        out: torch.Tensor = self.head(outputs.mean(dim=1))
        return out
